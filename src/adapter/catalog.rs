//! The adapter catalog: the one owner of adapter names below HTTP.
//!
//! It knows every name and where it comes from (the [`AdapterStore`], or a folder registered
//! through vLLM's `load_lora_adapter`), which stored adapters failed validation (and why), and
//! it validates uploads and registrations against the base model before anything becomes
//! visible. The engine owns it; the HTTP layer only calls the engine's verbs.
//!
//! Every change to a name (write, replace, delete, register, unregister) happens under one
//! lock and bumps the name's *generation*. Two things follow:
//! - the caller's `install`/`invalidate` callback runs under that lock too, so the engine's
//!   worker sees cache updates in the order the store saw the writes (two concurrent replaces
//!   can never leave the cache on the version the store lost);
//! - a load that started before a change can tell, when it finishes, that its files are stale.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use super::{load_bytes, load_dir, valid_name, Adapter, AdapterConfig, AdapterError, AdapterInfo};
use super::{AdapterStore, StoreError};
use crate::ops::BaseLinears;

/// Where an adapter's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A folder of the adapter store.
    Store,
    /// A folder registered through `load_lora_adapter` (not in the store).
    Registered,
}

/// A name resolved to where its files are, at a generation.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The adapter's folder; `None` for an object store (its files are fetched at load).
    pub dir: Option<PathBuf>,
    pub source: Source,
    /// The name's generation when it was resolved (see [`Catalog::generation`]).
    pub generation: u64,
}

/// What the catalog knows of one adapter without loading it.
#[derive(Debug, Clone)]
pub struct Described {
    pub name: String,
    pub source: Source,
    /// The parsed `adapter_config.json`; `None` when it does not parse.
    pub config: Option<AdapterConfig>,
    /// The loader's error, for a stored adapter that failed validation.
    pub refused: Option<String>,
}

/// Why a catalog operation did not happen. Nothing stored or registered changed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("adapter name {0:?} is invalid: use 1–64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit")]
    InvalidName(String),
    #[error("adapter {0:?} already exists")]
    Exists(String),
    #[error("adapter {0:?} does not exist")]
    NotFound(String),
    /// The adapter's files do not validate against the base model (or cannot be read).
    #[error(transparent)]
    Invalid(#[from] AdapterError),
    #[error(transparent)]
    Store(StoreError),
    #[error("lora_path {0:?} does not exist")]
    PathMissing(String),
    #[error("lora_path must be a folder under the adapter root {}", .0.display())]
    PathOutsideRoot(PathBuf),
    #[error("load_lora_adapter needs --adapter-root (a local folder) when adapters live in an object store")]
    NoRegistrationRoot,
    #[error("adapter root {}: {source}", path.display())]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<StoreError> for CatalogError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidName(n) => CatalogError::InvalidName(n),
            StoreError::Exists(n) => CatalogError::Exists(n),
            StoreError::NotFound(n) => CatalogError::NotFound(n),
            e => CatalogError::Store(e),
        }
    }
}

/// An upload: the two files' bytes under a name.
#[derive(Debug, Clone, Copy)]
pub struct Upload<'a> {
    pub name: &'a str,
    pub config: &'a [u8],
    pub weights: &'a [u8],
    /// Replace an adapter of the same name (else that is [`CatalogError::Exists`]).
    pub replace: bool,
}

#[derive(Debug, Default)]
struct Names {
    /// `load_lora_adapter` registrations: name → canonical folder.
    registered: HashMap<String, PathBuf>,
    /// Stored adapters that failed validation, with the loader's message.
    refused: HashMap<String, String>,
    /// The clock value of each name's last change (0: never changed).
    changed: HashMap<String, u64>,
    clock: u64,
}

impl Names {
    fn change(&mut self, name: &str) {
        self.clock += 1;
        self.changed.insert(name.to_string(), self.clock);
        self.refused.remove(name);
    }
}

/// The adapter catalog (see the module doc).
#[derive(Debug)]
pub struct Catalog {
    store: AdapterStore,
    /// `load_lora_adapter` paths must lie under this folder (none: registrations refused).
    registration_root: Option<PathBuf>,
    names: RwLock<Names>,
    /// Serialises changes: each runs its store write and its callback under it.
    changes: Mutex<()>,
}

impl Catalog {
    /// A catalog over `store`; registrations must lie under `registration_root` (a folder
    /// store's own folder when `None`; an object store then refuses registrations).
    pub fn new(store: AdapterStore, registration_root: Option<PathBuf>) -> Self {
        let registration_root = registration_root.or_else(|| store.root().map(Path::to_path_buf));
        Self {
            store,
            registration_root,
            names: RwLock::default(),
            changes: Mutex::new(()),
        }
    }

    /// A catalog over the store at `dir` (opened, and recovered, as [`AdapterStore::open`]).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Ok(Self::new(AdapterStore::open(dir)?, None))
    }

    pub fn store(&self) -> &AdapterStore {
        &self.store
    }

    fn names(&self) -> std::sync::RwLockReadGuard<'_, Names> {
        self.names.read().unwrap_or_else(|p| p.into_inner())
    }

    fn names_mut(&self) -> std::sync::RwLockWriteGuard<'_, Names> {
        self.names.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_changes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where `name` lives now: a registered folder first, then the store.
    pub fn resolve(&self, name: &str) -> Option<Resolved> {
        let names = self.names();
        let generation = names.changed.get(name).copied().unwrap_or(0);
        if let Some(dir) = names.registered.get(name) {
            return Some(Resolved {
                dir: Some(dir.clone()),
                source: Source::Registered,
                generation,
            });
        }
        self.store.exists(name).then(|| Resolved {
            dir: self.store.root().map(|r| r.join(name)),
            source: Source::Store,
            generation,
        })
    }

    pub fn exists(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// The name's generation: it changes with every write, replace, delete, registration or
    /// unregistration of the name, so a load can tell whether its files are still current.
    pub fn generation(&self, name: &str) -> u64 {
        self.names().changed.get(name).copied().unwrap_or(0)
    }

    /// Every name (stored and registered), sorted.
    pub fn list(&self) -> Vec<String> {
        let mut names = self.store.list();
        names.extend(self.names().registered.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// What is known of `name` from its configuration alone; `None` if there is no such name.
    pub fn describe(&self, name: &str) -> Option<Described> {
        let r = self.resolve(name)?;
        let config = match &r.dir {
            Some(dir) => std::fs::read(dir.join("adapter_config.json")).ok()?,
            None => self.store.config(name)?,
        };
        Some(Described {
            name: name.to_string(),
            source: r.source,
            config: AdapterConfig::parse(&config).ok(),
            refused: self.names().refused.get(name).cloned(),
        })
    }

    /// Validate `up` against `base`, write it to the store atomically (replacing, if asked),
    /// and hand the loaded adapter to `install` (with the seconds its load took) under the
    /// change lock. A registration of the same name is dropped: the store's version wins.
    pub fn upload(
        &self,
        up: Upload<'_>,
        base: &dyn BaseLinears,
        install: impl FnOnce(Adapter, f64),
    ) -> Result<AdapterInfo, CatalogError> {
        if !valid_name(up.name) {
            return Err(CatalogError::InvalidName(up.name.to_string()));
        }
        if !up.replace && self.exists(up.name) {
            return Err(CatalogError::Exists(up.name.to_string()));
        }
        // Fully parse and validate before anything touches the store.
        let start = Instant::now();
        let adapter = load_bytes(up.name, up.config, up.weights, base)?;
        let secs = start.elapsed().as_secs_f64();
        let _changing = self.lock_changes();
        if !up.replace && self.names().registered.contains_key(up.name) {
            return Err(CatalogError::Exists(up.name.to_string()));
        }
        self.store
            .write(up.name, up.config, up.weights, up.replace)?;
        {
            let mut names = self.names_mut();
            names.registered.remove(up.name);
            names.change(up.name);
        }
        let info = adapter.info.clone();
        install(adapter, secs);
        Ok(info)
    }

    /// Remove `name`: a registration, or else the stored adapter. `invalidate` runs under the
    /// change lock (in-flight requests keep the version they hold).
    pub fn delete(&self, name: &str, invalidate: impl FnOnce()) -> Result<(), CatalogError> {
        let _changing = self.lock_changes();
        let registered = self.names_mut().registered.remove(name).is_some();
        if !registered {
            // A shared store's name this replica has not seen yet (uploaded elsewhere an
            // instant ago) is looked up rather than refused.
            if valid_name(name) && !self.store.exists(name) {
                self.store.lookup(name);
            }
            if !valid_name(name) || !self.store.exists(name) {
                return Err(CatalogError::NotFound(name.to_string()));
            }
            self.store.delete(name)?;
        }
        self.names_mut().change(name);
        invalidate();
        Ok(())
    }

    /// Register the folder `path` (absolute, or relative to the registration root; links
    /// followed; it must lie under the root) as adapter `name`, after validating it against
    /// `base`. `install` gets the loaded adapter under the change lock.
    pub fn register(
        &self,
        name: &str,
        path: &str,
        base: &dyn BaseLinears,
        install: impl FnOnce(Adapter, f64),
    ) -> Result<AdapterInfo, CatalogError> {
        if !valid_name(name) {
            return Err(CatalogError::InvalidName(name.to_string()));
        }
        if self.exists(name) {
            return Err(CatalogError::Exists(name.to_string()));
        }
        let Some(root) = &self.registration_root else {
            return Err(CatalogError::NoRegistrationRoot);
        };
        let root = root.canonicalize().map_err(|source| CatalogError::Root {
            path: root.clone(),
            source,
        })?;
        let given = PathBuf::from(path);
        let dir = if given.is_absolute() {
            given
        } else {
            root.join(given)
        };
        let dir = dir
            .canonicalize()
            .map_err(|_| CatalogError::PathMissing(path.to_string()))?;
        if !dir.starts_with(&root) || !dir.is_dir() {
            return Err(CatalogError::PathOutsideRoot(root));
        }
        let start = Instant::now();
        let mut adapter = load_dir(&dir, base)?;
        let secs = start.elapsed().as_secs_f64();
        adapter.name = name.to_string();
        // Check again under the lock, then insert: of two concurrent registrations of one
        // name, exactly one wins and the other is told the name exists.
        let _changing = self.lock_changes();
        {
            let mut names = self.names_mut();
            if names.registered.contains_key(name) || self.store.exists(name) {
                return Err(CatalogError::Exists(name.to_string()));
            }
            names.registered.insert(name.to_string(), dir);
            names.change(name);
        }
        let info = adapter.info.clone();
        install(adapter, secs);
        Ok(info)
    }

    /// vLLM's `unload_lora_adapter`: a registration is removed (`Ok(true)`); a stored adapter
    /// stays on disk and is only dropped from memory (`Ok(false)`). `invalidate` runs under the
    /// change lock either way.
    pub fn unregister(&self, name: &str, invalidate: impl FnOnce()) -> Result<bool, CatalogError> {
        let _changing = self.lock_changes();
        let registered = self.names_mut().registered.remove(name).is_some();
        if !registered && !self.store.exists(name) {
            return Err(CatalogError::NotFound(name.to_string()));
        }
        self.names_mut().change(name);
        invalidate();
        Ok(registered)
    }

    /// The loader's error for a stored adapter that failed validation.
    pub fn refusal(&self, name: &str) -> Option<String> {
        self.names().refused.get(name).cloned()
    }

    /// Validate every stored adapter against `base` (a full load each, ~0.2 s for a SmolLM2
    /// r16 adapter); those that fail are listed as refused, with the loader's message, until
    /// they are replaced or deleted. Returns the refused names. An adapter changed while its
    /// check ran is not marked from its old files.
    /// A shared store is not checked at start-up (each replica would fetch every adapter):
    /// its uploads were validated by the replica that took them, and a load checks again.
    pub fn check_store(&self, base: &dyn BaseLinears) -> Vec<String> {
        let mut bad = Vec::new();
        let Some(root) = self.store.root() else {
            return bad;
        };
        for name in self.store.list() {
            let before = self.generation(&name);
            if let Err(e) = load_dir(&root.join(&name), base) {
                let mut names = self.names_mut();
                if names.changed.get(&name).copied().unwrap_or(0) != before {
                    continue; // the new files get their own check when they are loaded
                }
                tracing::warn!(
                    "adapter {name} in the store does not validate and will fail its requests: {e}"
                );
                eprintln!("warning: adapter {name} does not validate: {e}");
                names.refused.insert(name.clone(), e.to_string());
                bad.push(name);
            }
        }
        bad
    }
}

impl Catalog {
    /// Load `name` from where `resolved` says its files are: a folder, or the object store
    /// (through its disk cache). The adapter is named `name`.
    pub fn load(
        &self,
        name: &str,
        resolved: &Resolved,
        base: &dyn BaseLinears,
    ) -> Result<Adapter, AdapterError> {
        let mut adapter = match (&resolved.dir, &self.store) {
            (Some(dir), _) => load_dir(dir, base)?,
            (None, AdapterStore::Object(o)) => {
                let f = o.fetch(name).map_err(AdapterError::from_store)?;
                load_bytes(name, &f.config, &f.weights, base)?
            }
            (None, AdapterStore::Dir(_)) => unreachable!("a folder store resolves to a folder"),
        };
        adapter.name = name.to_string();
        Ok(adapter)
    }

    /// Take in what changed in a shared store since the last look (written, replaced or
    /// deleted by another replica): each changed name gets a new generation and `invalidate`
    /// (under the change lock, like a local change). Returns the changed names.
    pub fn refresh(&self, mut invalidate: impl FnMut(&str)) -> Result<Vec<String>, StoreError> {
        if !self.store.is_remote() {
            return Ok(Vec::new());
        }
        let _changing = self.lock_changes();
        let changed = self.store.refresh()?;
        for name in &changed {
            tracing::info!("adapter {name} changed in the shared store");
            self.names_mut().change(name);
            invalidate(name);
        }
        Ok(changed)
    }

    /// A request named `name`, which this replica does not know: ask a shared store now
    /// (rate-limited per name) instead of waiting for the next refresh. True if it exists.
    pub fn lookup(&self, name: &str, invalidate: impl FnOnce()) -> bool {
        if self.exists(name) || !self.store.is_remote() {
            return self.exists(name);
        }
        let _changing = self.lock_changes();
        if self.store.lookup(name) {
            self.names_mut().change(name);
            invalidate();
        }
        self.exists(name)
    }
}

//! The local disk tier below the in-memory adapter LRU, for adapters fetched from an object
//! store: `DIR/NAME/VERSION/{adapter_config.json, adapter_model.safetensors}` under a byte
//! budget, least recently used first out.
//!
//! Versions are immutable (a replaced adapter gets a new version key), so an entry never
//! changes once written. Entries are written to a temporary folder and renamed into place,
//! and every read is checked against the manifest's digest: a damaged or half-written entry
//! is dropped and fetched again, never served.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::adapter::{digest, valid_name};

const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";
const TMP: &str = ".tmp-";

#[derive(Debug, Default)]
struct State {
    /// (name, version) → (bytes on disk, last use tick).
    entries: HashMap<(String, String), (u64, u64)>,
    used: u64,
    tick: u64,
    hits: u64,
    misses: u64,
}

/// What the disk cache holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskCacheStats {
    pub entries: usize,
    pub bytes: u64,
    pub budget: u64,
    pub hits: u64,
    pub misses: u64,
}

#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
}

impl DiskCache {
    /// Open the cache at `dir` (created if needed), adopting the whole entries already there
    /// (oldest first by modification time) and removing leftovers of interrupted writes.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for e in fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP) {
                let _ = fs::remove_dir_all(e.path());
                continue;
            }
            if !valid_name(&name) || !e.path().is_dir() {
                continue;
            }
            for v in fs::read_dir(e.path())?.flatten() {
                let version = v.file_name().to_string_lossy().into_owned();
                let (c, w) = (v.path().join(CONFIG), v.path().join(WEIGHTS));
                match (fs::metadata(&c), fs::metadata(&w)) {
                    (Ok(cm), Ok(wm)) => {
                        let mtime = wm.modified().ok();
                        found.push((mtime, name.clone(), version, cm.len() + wm.len()));
                    }
                    _ => {
                        let _ = fs::remove_dir_all(v.path());
                    }
                }
            }
        }
        found.sort();
        let mut state = State::default();
        for (_, name, version, bytes) in found {
            state.tick += 1;
            state.used += bytes;
            state.entries.insert((name, version), (bytes, state.tick));
        }
        let cache = Self {
            dir: dir.to_path_buf(),
            budget,
            state: Mutex::new(state),
        };
        cache.make_room(0);
        Ok(cache)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry_dir(&self, name: &str, version: &str) -> PathBuf {
        self.dir.join(name).join(version)
    }

    /// The two files of `name` at `version`, if cached whole and matching `want` (the
    /// manifest's digest); a damaged entry is removed.
    pub fn get(&self, name: &str, version: &str, want: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        let key = (name.to_string(), version.to_string());
        if !self.lock().entries.contains_key(&key) {
            self.lock().misses += 1;
            return None;
        }
        let d = self.entry_dir(name, version);
        let read = fs::read(d.join(CONFIG)).and_then(|c| Ok((c, fs::read(d.join(WEIGHTS))?)));
        let mut st = self.lock();
        match read {
            Ok((c, w)) if digest(&c, &w) == want => {
                st.tick += 1;
                let tick = st.tick;
                if let Some(e) = st.entries.get_mut(&key) {
                    e.1 = tick;
                }
                st.hits += 1;
                Some((c, w))
            }
            _ => {
                tracing::warn!("adapter disk cache: dropping damaged entry {}", d.display());
                if let Some((bytes, _)) = st.entries.remove(&key) {
                    st.used -= bytes;
                }
                st.misses += 1;
                drop(st);
                let _ = fs::remove_dir_all(&d);
                None
            }
        }
    }

    /// Keep `name` at `version`. Room is made first (least recently used out), so the entry
    /// just written survives at least until the next one. A failure to write only costs a
    /// later fetch: it is logged, never returned.
    pub fn put(&self, name: &str, version: &str, config: &[u8], weights: &[u8]) {
        let bytes = (config.len() + weights.len()) as u64;
        if bytes > self.budget {
            return;
        }
        self.make_room(bytes);
        let tmp = self.dir.join(format!("{TMP}{}", super::object::unique()));
        let live = self.entry_dir(name, version);
        let write = || -> std::io::Result<()> {
            fs::create_dir_all(&tmp)?;
            fs::write(tmp.join(CONFIG), config)?;
            fs::write(tmp.join(WEIGHTS), weights)?;
            fs::create_dir_all(self.dir.join(name))?;
            fs::rename(&tmp, &live)
        };
        match write() {
            Ok(()) => {
                let mut st = self.lock();
                st.tick += 1;
                let tick = st.tick;
                if let Some(old) = st
                    .entries
                    .insert((name.into(), version.into()), (bytes, tick))
                {
                    st.used -= old.0;
                }
                st.used += bytes;
            }
            Err(e) => {
                // Already there (another thread wrote the same immutable version) or a full
                // disk: either way nothing half-written stays.
                let _ = fs::remove_dir_all(&tmp);
                if !live.join(WEIGHTS).is_file() {
                    tracing::warn!("adapter disk cache: could not keep {name}: {e}");
                }
            }
        }
    }

    /// Evict least recently used entries until `incoming` more bytes fit the budget.
    fn make_room(&self, incoming: u64) {
        loop {
            let victim = {
                let mut st = self.lock();
                if st.used + incoming <= self.budget {
                    return;
                }
                let Some(key) = st
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, tick))| *tick)
                    .map(|(k, _)| k.clone())
                else {
                    return;
                };
                let (bytes, _) = st.entries.remove(&key).expect("present");
                st.used -= bytes;
                key
            };
            let d = self.entry_dir(&victim.0, &victim.1);
            let _ = fs::remove_dir_all(&d);
            let _ = fs::remove_dir(self.dir.join(&victim.0)); // only if now empty
        }
    }

    pub fn stats(&self) -> DiskCacheStats {
        let st = self.lock();
        DiskCacheStats {
            entries: st.entries.len(),
            bytes: st.used,
            budget: self.budget,
            hits: st.hits,
            misses: st.misses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_whole_entries_under_budget_and_drops_damaged_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 25).unwrap();
        let (c, w) = (b"{}".to_vec(), vec![7u8; 8]);
        let d = digest(&c, &w);
        cache.put("a", "v1", &c, &w);
        cache.put("b", "v1", &c, &w);
        assert_eq!(cache.get("a", "v1", &d), Some((c.clone(), w.clone())));
        // A third entry (10 bytes) needs room: b, the least recently used, goes.
        cache.put("c", "v1", &c, &w);
        assert_eq!(cache.get("b", "v1", &d), None);
        assert!(cache.get("a", "v1", &d).is_some() && cache.get("c", "v1", &d).is_some());
        assert_eq!(cache.stats().bytes, 20);
        // A wrong digest (damaged file) is never served, and the entry is dropped.
        fs::write(dir.path().join("a/v1").join(WEIGHTS), b"xxxxxxxx").unwrap();
        assert_eq!(cache.get("a", "v1", &d), None);
        assert!(!dir.path().join("a/v1").exists());
        // Reopened: whole entries adopted, a half-written temporary folder removed.
        fs::create_dir_all(dir.path().join(".tmp-9")).unwrap();
        fs::create_dir_all(dir.path().join("d/v1")).unwrap();
        fs::write(dir.path().join("d/v1").join(CONFIG), b"{}").unwrap();
        let cache = DiskCache::open(dir.path(), 25).unwrap();
        assert_eq!(cache.stats().entries, 1);
        assert!(cache.get("c", "v1", &d).is_some());
        assert!(!dir.path().join(".tmp-9").exists() && !dir.path().join("d/v1").exists());
    }
}

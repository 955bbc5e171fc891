//! The folder store (`file://DIR`, the default): adapter `NAME` is the folder `ROOT/NAME` holding
//! `adapter_config.json` and `adapter_model.safetensors`. It is the source of truth for names.
//!
//! Writes are atomic: files go to a hidden temporary folder, are fsynced, and the folder is
//! renamed into place (a replaced adapter is first renamed aside, then removed). On open, the
//! store finishes or rolls back whatever an interrupted write left, so a crash never leaves a
//! half adapter under a name.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::StoreError;
use crate::adapter::valid_name;

const TMP: &str = ".tmp-";
const OLD: &str = ".old-";
const DEL: &str = ".del-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[derive(Debug)]
pub struct DirStore {
    root: PathBuf,
    /// Serialises writers: concurrent uploads of one name never interleave their renames.
    write_lock: Mutex<()>,
    /// Test hook: a pause between a write's two files (zero in service).
    write_pause: std::time::Duration,
}

impl DirStore {
    /// Open (creating if needed) the store at `root`, cleaning up after interrupted writes.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            path: root.to_path_buf(),
            source,
        };
        fs::create_dir_all(root).map_err(io)?;
        let store = Self {
            root: root.to_path_buf(),
            write_lock: Mutex::new(()),
            write_pause: std::time::Duration::ZERO,
        };
        store.recover()?;
        Ok(store)
    }

    /// Test hook: pause this long between the two files of every write, so that a test can
    /// kill the process while a partial write is on disk.
    pub fn with_write_pause(mut self, pause: std::time::Duration) -> Self {
        self.write_pause = pause;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io {
            path: path.clone(),
            source,
        }
    }

    /// Leftovers: temporary folders are removed; a replaced adapter renamed aside whose
    /// replacement never landed is put back; one whose replacement landed is removed.
    fn recover(&self) -> Result<(), StoreError> {
        let entries = fs::read_dir(&self.root).map_err(self.io(&self.root))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if name.starts_with(TMP) || name.starts_with(DEL) {
                tracing::warn!(
                    "adapter store: removing leftover of an interrupted write: {}",
                    path.display()
                );
                fs::remove_dir_all(&path).map_err(self.io(&path))?;
            } else if let Some(rest) = name.strip_prefix(OLD) {
                // `.old-NAME-PID-N`: NAME may itself contain '-', the suffix has two parts.
                let adapter = rest.rsplitn(3, '-').nth(2).unwrap_or(rest).to_string();
                let live = self.root.join(&adapter);
                if live.exists() {
                    fs::remove_dir_all(&path).map_err(self.io(&path))?;
                } else {
                    tracing::warn!(
                        "adapter store: restoring {adapter} after an interrupted replace"
                    );
                    fs::rename(&path, &live).map_err(self.io(&live))?;
                }
            }
        }
        Ok(())
    }

    /// The folder of adapter `name` (which may not exist).
    pub fn dir(&self, name: &str) -> Result<PathBuf, StoreError> {
        if !valid_name(name) {
            return Err(StoreError::InvalidName(name.to_string()));
        }
        Ok(self.root.join(name))
    }

    pub fn exists(&self, name: &str) -> bool {
        self.dir(name)
            .is_ok_and(|d| d.join("adapter_config.json").is_file())
    }

    /// Names of the stored adapters, sorted.
    pub fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.root)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| valid_name(n) && self.exists(n))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Write an adapter atomically. The caller has validated the bytes.
    pub fn write(
        &self,
        name: &str,
        config: &[u8],
        weights: &[u8],
        replace: bool,
    ) -> Result<(), StoreError> {
        let live = self.dir(name)?;
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        if live.exists() && !replace {
            return Err(StoreError::Exists(name.to_string()));
        }
        let tmp = self.root.join(format!("{TMP}{name}-{}", unique()));
        let result = (|| {
            fs::create_dir(&tmp).map_err(self.io(&tmp))?;
            for (file, bytes) in [
                ("adapter_config.json", config),
                ("adapter_model.safetensors", weights),
            ] {
                let p = tmp.join(file);
                let mut f = File::create(&p).map_err(self.io(&p))?;
                f.write_all(bytes).map_err(self.io(&p))?;
                f.sync_all().map_err(self.io(&p))?;
                if file == "adapter_config.json" && !self.write_pause.is_zero() {
                    std::thread::sleep(self.write_pause);
                }
            }
            sync_dir(&tmp)?;
            if live.exists() {
                // Swap in one step where the OS can (readers see the old or the new version,
                // never no adapter); the old version is then under the temporary name, which
                // recovery removes if we crash before we do.
                if exchange(&tmp, &live) {
                    sync_dir(&self.root)?;
                    fs::remove_dir_all(&tmp).map_err(self.io(&tmp))?;
                    return sync_dir(&self.root);
                }
                let old = self.root.join(format!("{OLD}{name}-{}", unique()));
                fs::rename(&live, &old).map_err(self.io(&live))?;
                fs::rename(&tmp, &live).map_err(self.io(&live))?;
                sync_dir(&self.root)?;
                fs::remove_dir_all(&old).map_err(self.io(&old))?;
            } else {
                fs::rename(&tmp, &live).map_err(self.io(&live))?;
            }
            sync_dir(&self.root)
        })();
        if result.is_err() && tmp.exists() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Remove an adapter: renamed aside first, so it disappears from the store at once.
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let live = self.dir(name)?;
        let _guard = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        if !live.exists() {
            return Err(StoreError::NotFound(name.to_string()));
        }
        let del = self.root.join(format!("{DEL}{name}-{}", unique()));
        fs::rename(&live, &del).map_err(self.io(&live))?;
        sync_dir(&self.root)?;
        fs::remove_dir_all(&del).map_err(self.io(&del))
    }
}

/// Atomically exchange two paths (Linux `renameat2(RENAME_EXCHANGE)`); false where the OS or
/// file system cannot, and the caller falls back to two renames.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (Ok(a), Ok(b)) = (
        CString::new(a.as_os_str().as_bytes()),
        CString::new(b.as_os_str().as_bytes()),
    ) else {
        return false;
    };
    // SAFETY: two valid NUL-terminated paths; the syscall reads them and nothing else.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> bool {
    false
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replaces_deletes_and_recovers() {
        let root = tempfile::tempdir().unwrap();
        let store = DirStore::open(root.path()).unwrap();
        store.write("a-1", b"{}", b"x", false).unwrap();
        assert!(matches!(
            store.write("a-1", b"{}", b"y", false),
            Err(StoreError::Exists(_))
        ));
        store.write("a-1", b"{\"v\":2}", b"y", true).unwrap();
        assert_eq!(
            fs::read(root.path().join("a-1/adapter_model.safetensors")).unwrap(),
            b"y"
        );
        assert_eq!(store.list(), vec!["a-1"]);
        for bad in ["../x", "a/b", "", ".hidden", "x\0y", &"n".repeat(65)] {
            assert!(
                matches!(
                    store.write(bad, b"{}", b"x", false),
                    Err(StoreError::InvalidName(_))
                ),
                "{bad:?}"
            );
        }
        // Leftovers of interrupted writes: a temp folder goes; an aside copy whose replacement
        // never landed comes back; one whose replacement landed goes.
        fs::create_dir(root.path().join(".tmp-b-1-2")).unwrap();
        fs::create_dir(root.path().join(".old-c-x-1-2")).unwrap();
        fs::write(root.path().join(".old-c-x-1-2/adapter_config.json"), b"{}").unwrap();
        fs::create_dir(root.path().join(".old-a-1-9-9")).unwrap();
        let store = DirStore::open(root.path()).unwrap();
        assert_eq!(store.list(), vec!["a-1", "c-x"]);
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 2);
        store.delete("a-1").unwrap();
        assert!(matches!(store.delete("a-1"), Err(StoreError::NotFound(_))));
        assert_eq!(store.list(), vec!["c-x"]);
    }
}

use super::*;
use crate::adapter::digest;
use futures_util::StreamExt;
use object_store::memory::InMemory;
use object_store::{ObjectStoreExt, PutMode, UpdateVersion};

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

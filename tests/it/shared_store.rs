//! Two servers ("replicas") on one object store, in process: the `object_store` in-memory
//! backend behind a switch that can make it unreachable. The same paths as S3 (manifests,
//! conditional puts, refresh, lookup on a miss, the disk tier, 503 while the store is down);
//! `tests/replicas/run.sh` runs them against a real S3 server, HAProxy and killed processes.

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::http::StatusCode;
use bytes::Bytes;
use dora_serve::adapter::{AdapterStore, Catalog, ObjectAdapterStore, RemoteOptions};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use serde_json::{json, Value};

use crate::web::*;

/// An object store that fails every call while `down` is set, as an unreachable S3 would.
#[derive(Debug)]
struct Switch {
    inner: InMemory,
    down: AtomicBool,
}

impl fmt::Display for Switch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Switch")
    }
}

impl Switch {
    fn check(&self) -> object_store::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(object_store::Error::Generic {
                store: "switch",
                source: "connection refused".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for Switch {
    async fn put_opts(
        &self,
        p: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.check()?;
        self.inner.put_opts(p, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        p: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check()?;
        self.inner.put_multipart_opts(p, opts).await
    }
    async fn get_opts(&self, p: &Path, opts: GetOptions) -> object_store::Result<GetResult> {
        self.check()?;
        self.inner.get_opts(p, opts).await
    }
    async fn get_ranges(&self, p: &Path, r: &[Range<u64>]) -> object_store::Result<Vec<Bytes>> {
        self.check()?;
        self.inner.get_ranges(p, r).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        if let Err(e) = self.check() {
            return futures_util::stream::once(async { Err(e) }).boxed();
        }
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if let Err(e) = self.check() {
            return futures_util::stream::once(async { Err(e) }).boxed();
        }
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.check()?;
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, o: CopyOptions) -> object_store::Result<()> {
        self.check()?;
        self.inner.copy_opts(from, to, o).await
    }
}

fn replica(switch: &Arc<Switch>, cache: &std::path::Path) -> Server {
    let remote = RemoteOptions {
        disk_cache_dir: cache.to_path_buf(),
        disk_cache_bytes: 64 << 20,
        old_version_grace: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
    };
    let store: Arc<dyn ObjectStore> = switch.clone();
    let object = ObjectAdapterStore::new(
        store.clone(),
        store,
        "p",
        "s3://test/p".into(),
        vec![],
        remote,
    )
    .unwrap();
    server_opts(Opts {
        catalog: Some(Catalog::new(AdapterStore::Object(object), None)),
        ..Opts::default()
    })
}

async fn upload(s: &Server, name: &str, fixture: &str, replace: bool) -> (StatusCode, Value) {
    let (cfg, weights) = fixture_files(fixture);
    let uri = if replace {
        "/v1/adapters?replace=true"
    } else {
        "/v1/adapters"
    };
    let (st, v, _) = call(
        &s.app,
        multipart(
            &[
                ("name", name.as_bytes()),
                ("adapter_config", &cfg),
                ("adapter_model", &weights),
            ],
            uri,
        ),
    )
    .await;
    (st, v)
}

async fn complete(s: &Server, model: &str) -> (StatusCode, Value) {
    let (st, v, _) = call(
        &s.app,
        post_json(
            "/v1/completions",
            json!({"prompt": PROMPT, "max_tokens": 3, "temperature": 0, "model": model}),
        ),
    )
    .await;
    (st, v)
}

async fn refresh(s: &Server) -> Vec<String> {
    let e = s.engine.clone();
    tokio::task::spawn_blocking(move || e.refresh_adapters().unwrap_or_default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_uploads_replaces_and_deletes_and_ride_out_an_outage() {
    let switch = Arc::new(Switch {
        inner: InMemory::new(),
        down: AtomicBool::new(false),
    });
    let (ca, cb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (replica(&switch, ca.path()), replica(&switch, cb.path()));

    // Uploaded on A, served by B at once (B looks the unknown name up), same digest and text.
    let (st, up) = upload(&a, "shared", "dora-all-r8", false).await;
    assert_eq!(st, StatusCode::CREATED, "{up}");
    let digest = up["digest"].as_str().unwrap().to_string();
    let (st, ra) = complete(&a, "shared").await;
    let (st2, rb) = complete(&b, "shared").await;
    assert_eq!((st, st2), (StatusCode::OK, StatusCode::OK), "{ra} {rb}");
    assert_eq!(rb["adapter_digest"], digest.as_str());
    assert_eq!(ra["choices"][0]["text"], rb["choices"][0]["text"]);
    // A second upload of the name elsewhere is refused as existing.
    let (st, v) = upload(&b, "shared", "lora-r8", false).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("adapter_exists"))
    );

    // Replaced on B: A serves the old version (cached) until its refresh, then the new one.
    let (st, up2) = upload(&b, "shared", "lora-r8", true).await;
    assert_eq!(st, StatusCode::CREATED, "{up2}");
    let digest2 = up2["digest"].as_str().unwrap().to_string();
    assert_ne!(digest, digest2);
    assert_eq!(
        complete(&a, "shared").await.1["adapter_digest"],
        digest.as_str()
    );
    assert_eq!(refresh(&a).await, vec!["shared"]);
    assert_eq!(
        complete(&a, "shared").await.1["adapter_digest"],
        digest2.as_str()
    );

    // The store goes away: cached adapters serve; uploads and uncached ones get 503.
    assert_eq!(
        upload(&b, "cold", "dora-all-r8", false).await.0,
        StatusCode::CREATED
    );
    assert_eq!(refresh(&a).await, vec!["cold"]);
    switch.down.store(true, Ordering::SeqCst);
    assert_eq!(complete(&a, "shared").await.0, StatusCode::OK);
    let (st, v) = complete(&a, "cold").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], "adapter_store_unavailable");
    let (st, v) = upload(&a, "late", "lora-r8", false).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("adapter_store_unavailable")
        )
    );
    let (st, _, _) = call(&a.app, get("/ready")).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(call(&a.app, get("/health")).await.0, StatusCode::OK);
    // A's disk holds what it fetched: dropped from memory, "shared" still loads from disk.
    a.engine.evict_adapter("shared");
    assert_eq!(
        complete(&a, "shared").await.1["adapter_digest"],
        digest2.as_str()
    );

    // Back: the next look recovers; the uncached adapter serves.
    switch.down.store(false, Ordering::SeqCst);
    refresh(&a).await;
    assert_eq!(call(&a.app, get("/ready")).await.0, StatusCode::OK);
    assert_eq!(complete(&a, "cold").await.0, StatusCode::OK);

    // A name uploaded on B that A has not seen yet can be deleted through A at once.
    assert_eq!(
        upload(&b, "brief", "lora-r8", false).await.0,
        StatusCode::CREATED
    );
    let del = axum::http::Request::delete("/v1/adapters/brief")
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(call(&a.app, del).await.0, StatusCode::OK);

    // Deleted on A: B stops listing it at its next refresh, and answers 404 for it.
    let del = axum::http::Request::delete("/v1/adapters/shared")
        .body(axum::body::Body::empty())
        .unwrap();
    let (st, _, _) = call(&a.app, del).await;
    assert_eq!(st, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !refresh(&b).await.contains(&"shared".to_string()) {
        assert!(Instant::now() < deadline);
    }
    let (st, v) = complete(&b, "shared").await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
}

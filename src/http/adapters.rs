//! Adapter management: multipart upload (validated against the base model before it becomes
//! visible, then written atomically), list, describe, delete, and vLLM's
//! `load_lora_adapter` / `unload_lora_adapter`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Multipart, Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::dto::*;
use super::{ApiError, AppState, ErrorBody, JsonBody};
use crate::adapter::{self, valid_name, AdapterConfig};

fn describe(s: &AppState, name: &str) -> Option<AdapterDescription> {
    let dir = s.adapter_dir(name)?;
    let cfg = std::fs::read(dir.join("adapter_config.json")).ok()?;
    let cfg = AdapterConfig::parse(&cfg).ok();
    let stats = s.engine.stats();
    let refused = s.refused.read().ok().and_then(|r| r.get(name).cloned());
    let state = if refused.is_some() {
        "invalid"
    } else if stats.merged_adapters.iter().any(|n| n == name) {
        "merged"
    } else if stats.loaded_adapters.iter().any(|n| n == name) {
        "loaded"
    } else {
        "on_disk"
    };
    Some(AdapterDescription {
        name: name.to_string(),
        kind: match &cfg {
            Some(c) if c.use_dora => "dora".into(),
            Some(_) => "lora".into(),
            None => "invalid".into(),
        },
        r: cfg.as_ref().map_or(0, |c| c.r),
        lora_alpha: cfg.as_ref().map_or(0.0, |c| c.lora_alpha),
        use_rslora: cfg.as_ref().is_some_and(|c| c.use_rslora),
        modules: None,
        bytes: None,
        state: state.into(),
        digest: None,
        error: refused,
    })
}

/// Every adapter in the store and every registered one.
pub fn describe_all(s: &AppState) -> Vec<AdapterDescription> {
    let mut names = s.store.list();
    if let Ok(r) = s.registered.read() {
        names.extend(r.keys().cloned());
    }
    names.sort();
    names.dedup();
    names.iter().filter_map(|n| describe(s, n)).collect()
}

fn from_loaded(a: &adapter::Adapter) -> AdapterDescription {
    AdapterDescription {
        name: a.name.clone(),
        kind: a.info.kind.to_string(),
        r: a.info.r,
        lora_alpha: a.info.lora_alpha,
        use_rslora: a.info.use_rslora,
        modules: Some(a.info.modules.len()),
        bytes: Some(a.info.bytes),
        state: "on_disk".into(),
        digest: Some(a.info.digest.clone()),
        error: None,
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Replace an existing adapter of the same name.
    pub replace: Option<bool>,
}

fn multipart_error(s: &AppState, e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(s.cfg.max_upload_bytes)
    } else {
        ApiError::invalid(
            "body",
            format!("not a valid multipart/form-data body: {}", e.body_text()),
        )
    }
}

#[utoipa::path(post, path = "/v1/adapters", params(UploadQuery),
    request_body(content = AdapterUpload, content_type = "multipart/form-data", description = "fields: name (text), adapter_config (adapter_config.json), adapter_model (adapter_model.safetensors)"),
    responses((status = 201, body = AdapterDescription, description = "Created"), (status = 400, body = ErrorBody, description = "Invalid request"), (status = 409, body = ErrorBody, description = "Already exists"),
              (status = 413, body = ErrorBody, description = "Body too large"), (status = 415, body = ErrorBody, description = "Wrong content type"), (status = 422, body = ErrorBody, description = "The adapter failed validation")))]
pub async fn upload(
    State(s): State<AppState>,
    q: Result<Query<UploadQuery>, axum::extract::rejection::QueryRejection>,
    mp: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(StatusCode, Json<AdapterDescription>), ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::invalid(
            "replace",
            format!("{}; use ?replace=true or ?replace=false", e.body_text()),
        )
    })?;
    let mut mp = mp.map_err(|_| ApiError::UnsupportedMediaType("multipart/form-data"))?;
    let (mut name, mut config, mut weights) = (None, None, None);
    while let Some(field) = mp.next_field().await.map_err(|e| multipart_error(&s, e))? {
        let field_name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(|e| multipart_error(&s, e))?;
        match field_name.as_str() {
            "name" => {
                name = Some(
                    String::from_utf8(bytes.to_vec())
                        .map_err(|_| ApiError::invalid("name", "name must be UTF-8 text"))?,
                )
            }
            "adapter_config" => config = Some(bytes),
            "adapter_model" => weights = Some(bytes),
            other => {
                return Err(ApiError::invalid(
                    "body",
                    format!(
                    "unexpected form field {other:?}; send name, adapter_config and adapter_model"
                ),
                ))
            }
        }
    }
    let name = name.ok_or_else(|| ApiError::invalid("name", "the form field name is missing"))?;
    let config = config.ok_or_else(|| {
        ApiError::invalid(
            "adapter_config",
            "the form field adapter_config (adapter_config.json) is missing",
        )
    })?;
    let weights = weights.ok_or_else(|| {
        ApiError::invalid(
            "adapter_model",
            "the form field adapter_model (adapter_model.safetensors) is missing",
        )
    })?;
    if !valid_name(&name) {
        return Err(ApiError::invalid("name", format!("adapter name {name:?} is invalid: use 1–64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit")));
    }
    let replace = q.replace.unwrap_or(false);
    if !replace && s.adapter_exists(&name) {
        return Err(ApiError::AdapterExists(name));
    }
    // Fully parse and validate against the base model before anything touches the store.
    let model = Arc::clone(s.engine.model());
    let (n, c, w) = (name.clone(), config.clone(), weights.clone());
    let loaded = tokio::task::spawn_blocking(move || adapter::load_bytes(&n, &c, &w, &*model))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    let store = Arc::clone(&s.store);
    let n = name.clone();
    tokio::task::spawn_blocking(move || store.write(&n, &config, &weights, replace))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    if let Ok(mut r) = s.registered.write() {
        r.remove(&name);
    }
    // New requests load the new version; running ones finish on theirs.
    s.forget(&name);
    Ok((StatusCode::CREATED, Json(from_loaded(&loaded))))
}

#[utoipa::path(get, path = "/v1/adapters", responses((status = 200, body = AdapterList, description = "OK")))]
pub async fn list(State(s): State<AppState>) -> Json<AdapterList> {
    Json(AdapterList {
        object: "list",
        data: describe_all(&s),
    })
}

#[utoipa::path(get, path = "/v1/adapters/{name}", params(("name" = String, Path)),
    responses((status = 200, body = AdapterDescription, description = "OK"), (status = 404, body = ErrorBody, description = "Not found")))]
pub async fn get_one(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<AdapterDescription>, ApiError> {
    describe(&s, &name)
        .map(Json)
        .ok_or(ApiError::AdapterNotFound(name))
}

#[utoipa::path(delete, path = "/v1/adapters/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Deleted, description = "OK"), (status = 404, body = ErrorBody, description = "Not found")))]
pub async fn delete(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    let registered = s
        .registered
        .write()
        .ok()
        .and_then(|mut r| r.remove(&name))
        .is_some();
    if !registered {
        if !valid_name(&name) || !s.store.exists(&name) {
            return Err(ApiError::AdapterNotFound(name));
        }
        let store = Arc::clone(&s.store);
        let n = name.clone();
        tokio::task::spawn_blocking(move || store.delete(&n))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
    }
    // In-flight requests keep their lease and finish normally.
    s.forget(&name);
    Ok(Json(Deleted {
        name,
        deleted: true,
    }))
}

#[utoipa::path(post, path = "/v1/load_lora_adapter", request_body = LoadLoraRequest,
    responses((status = 200, body = AdapterDescription, description = "OK"), (status = 400, body = ErrorBody, description = "Invalid request"), (status = 409, body = ErrorBody, description = "Already exists"), (status = 415, body = ErrorBody, description = "Wrong content type"), (status = 422, body = ErrorBody, description = "The adapter failed validation")))]
pub async fn load_lora(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<LoadLoraRequest>,
) -> Result<Json<AdapterDescription>, ApiError> {
    if !valid_name(&req.lora_name) {
        return Err(ApiError::invalid(
            "lora_name",
            format!(
                "adapter name {:?} is invalid: use 1–64 characters from A-Z a-z 0-9 . _ -",
                req.lora_name
            ),
        ));
    }
    if s.adapter_exists(&req.lora_name) {
        return Err(ApiError::AdapterExists(req.lora_name));
    }
    // The path must resolve (links followed) to a folder under the adapter root.
    let root = s
        .cfg
        .adapter_root
        .canonicalize()
        .map_err(|e| ApiError::Internal(format!("adapter root: {e}")))?;
    let path = PathBuf::from(&req.lora_path);
    let path = if path.is_absolute() {
        path
    } else {
        root.join(path)
    };
    let path = path.canonicalize().map_err(|_| {
        ApiError::invalid(
            "lora_path",
            format!("lora_path {:?} does not exist", req.lora_path),
        )
    })?;
    if !path.starts_with(&root) || !path.is_dir() {
        return Err(ApiError::invalid(
            "lora_path",
            format!(
                "lora_path must be a folder under the adapter root {}",
                root.display()
            ),
        ));
    }
    let model = Arc::clone(s.engine.model());
    let p = path.clone();
    let mut loaded = tokio::task::spawn_blocking(move || adapter::load_dir(&p, &*model))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    loaded.name = req.lora_name.clone();
    {
        // Check again under the lock, then insert: of two concurrent registrations of one
        // name, exactly one wins and the other is told the name exists.
        let mut r = s
            .registered
            .write()
            .map_err(|_| ApiError::Internal("the adapter registry lock is poisoned".into()))?;
        if r.contains_key(&req.lora_name) || s.store.exists(&req.lora_name) {
            return Err(ApiError::AdapterExists(req.lora_name));
        }
        r.insert(req.lora_name.clone(), path);
    }
    s.forget(&req.lora_name);
    Ok(Json(from_loaded(&loaded)))
}

#[utoipa::path(post, path = "/v1/unload_lora_adapter", request_body = UnloadLoraRequest,
    responses((status = 200, body = Deleted, description = "OK"), (status = 400, body = ErrorBody, description = "Invalid request"), (status = 404, body = ErrorBody, description = "Not found"), (status = 415, body = ErrorBody, description = "Wrong content type")))]
pub async fn unload_lora(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<UnloadLoraRequest>,
) -> Result<Json<Deleted>, ApiError> {
    let name = req.lora_name;
    let registered = s
        .registered
        .write()
        .ok()
        .and_then(|mut r| r.remove(&name))
        .is_some();
    if !registered && !s.store.exists(&name) {
        return Err(ApiError::AdapterNotFound(name));
    }
    // A store adapter stays on disk; it is only dropped from memory.
    s.forget(&name);
    Ok(Json(Deleted {
        name,
        deleted: registered,
    }))
}

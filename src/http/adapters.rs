//! Adapter management: multipart upload (validated against the base model before it becomes
//! visible, then written atomically), list, describe, delete, and vLLM's
//! `load_lora_adapter` / `unload_lora_adapter`.

use axum::extract::{Multipart, Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::dto::*;
use super::{ApiError, AppState, ErrorBody, JsonBody};
use crate::engine::{AdapterEntry, AdapterInfo, AdapterState, Upload};

fn describe(e: AdapterEntry) -> AdapterDescription {
    let cfg = e.config.as_ref();
    AdapterDescription {
        name: e.name,
        kind: match cfg {
            Some(c) if c.use_dora => "dora".into(),
            Some(_) => "lora".into(),
            None => "invalid".into(),
        },
        r: cfg.map_or(0, |c| c.r),
        lora_alpha: cfg.map_or(0.0, |c| c.lora_alpha),
        use_rslora: cfg.is_some_and(|c| c.use_rslora),
        modules: None,
        bytes: None,
        state: e.state.as_str().into(),
        digest: None,
        error: e.error,
    }
}

/// Every adapter in the store and every registered one.
pub fn describe_all(s: &AppState) -> Vec<AdapterDescription> {
    s.engine.adapters().into_iter().map(describe).collect()
}

/// An adapter just validated and put into the cache by an upload or a registration.
fn from_loaded(name: &str, info: &AdapterInfo) -> AdapterDescription {
    AdapterDescription {
        name: name.to_string(),
        kind: info.kind.to_string(),
        r: info.r,
        lora_alpha: info.lora_alpha,
        use_rslora: info.use_rslora,
        modules: Some(info.modules.len()),
        bytes: Some(info.bytes),
        state: AdapterState::Loaded.as_str().into(),
        digest: Some(info.digest.clone()),
        error: None,
    }
}

/// Run a blocking catalog verb off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
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
    let replace = q.replace.unwrap_or(false);
    let engine = s.engine.clone();
    let info = blocking(move || {
        let up = Upload {
            name: &name,
            config: &config,
            weights: &weights,
            replace,
        };
        engine
            .upload_adapter(up)
            .map(|info| from_loaded(&name, &info))
            .map_err(|e| ApiError::catalog(e, "name"))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(info)))
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
    s.engine
        .adapter(&name)
        .map(|e| Json(describe(e)))
        .ok_or(ApiError::AdapterNotFound(name))
}

#[utoipa::path(delete, path = "/v1/adapters/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Deleted, description = "OK"), (status = 404, body = ErrorBody, description = "Not found")))]
pub async fn delete(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    let engine = s.engine.clone();
    blocking(move || {
        engine
            .delete_adapter(&name)
            .map_err(|e| ApiError::catalog(e, "name"))?;
        Ok(Json(Deleted {
            name,
            deleted: true,
        }))
    })
    .await
}

#[utoipa::path(post, path = "/v1/load_lora_adapter", request_body = LoadLoraRequest,
    responses((status = 200, body = AdapterDescription, description = "OK"), (status = 400, body = ErrorBody, description = "Invalid request"), (status = 409, body = ErrorBody, description = "Already exists"), (status = 415, body = ErrorBody, description = "Wrong content type"), (status = 422, body = ErrorBody, description = "The adapter failed validation")))]
pub async fn load_lora(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<LoadLoraRequest>,
) -> Result<Json<AdapterDescription>, ApiError> {
    let engine = s.engine.clone();
    blocking(move || {
        engine
            .register_adapter(&req.lora_name, &req.lora_path)
            .map(|info| Json(from_loaded(&req.lora_name, &info)))
            .map_err(|e| ApiError::catalog(e, "lora_name"))
    })
    .await
}

#[utoipa::path(post, path = "/v1/unload_lora_adapter", request_body = UnloadLoraRequest,
    responses((status = 200, body = Deleted, description = "OK"), (status = 400, body = ErrorBody, description = "Invalid request"), (status = 404, body = ErrorBody, description = "Not found"), (status = 415, body = ErrorBody, description = "Wrong content type")))]
pub async fn unload_lora(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<UnloadLoraRequest>,
) -> Result<Json<Deleted>, ApiError> {
    let name = req.lora_name;
    let deleted = s
        .engine
        .unregister_adapter(&name)
        .map_err(|e| ApiError::catalog(e, "lora_name"))?;
    Ok(Json(Deleted { name, deleted }))
}

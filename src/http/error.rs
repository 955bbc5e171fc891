//! API errors: every cause has an HTTP status and a stable `code`, mapped in one exhaustive
//! match, and is sent in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::{AdapterError, CatalogError, EngineError, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is wrong; `param` names it.
    #[error("{msg}")]
    InvalidRequest {
        msg: String,
        param: Option<&'static str>,
    },
    #[error("the request body is not valid JSON for this endpoint: {0}")]
    InvalidJson(String),
    #[error("expected Content-Type: {0}")]
    UnsupportedMediaType(&'static str),
    #[error("{0}")]
    ContextLength(String),
    #[error("missing or invalid API key: send Authorization: Bearer <key>")]
    Unauthorized,
    #[error("this operation needs the admin key: send Authorization: Bearer <admin key>")]
    Forbidden,
    #[error("adapter {0:?} does not exist; GET /v1/adapters lists the adapters")]
    AdapterNotFound(String),
    #[error("model {0:?} is neither the base model nor an adapter; GET /v1/models lists them")]
    ModelNotFound(String),
    #[error("adapter {0:?} already exists; add ?replace=true to replace it")]
    AdapterExists(String),
    #[error("{msg}")]
    AdapterInvalid { code: &'static str, msg: String },
    #[error("the request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the server is at capacity; retry after a moment")]
    Overloaded,
    #[error("the server is shutting down")]
    Unavailable,
    #[error(
        "the request did not finish within the server's request timeout of {0} s; \
         ask for fewer tokens (max_tokens, n) or retry when the server is less busy"
    )]
    Timeout(u64),
    #[error("internal error: {0}")]
    Internal(String),
    /// The shared adapter store cannot be reached (uploads, and adapters not cached here).
    #[error("{0}")]
    StoreUnavailable(String),
    /// A conditional write lost to another replica's concurrent write of the same name.
    #[error("{0}")]
    AdapterConflict(String),
    /// The store's copy of an adapter does not match its manifest.
    #[error("{0}")]
    StoreCorrupt(String),
}

/// OpenAI's error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: String,
}

impl ApiError {
    /// (status, type, code) — the one place causes map to HTTP.
    pub fn parts(&self) -> (StatusCode, &'static str, &'static str) {
        use ApiError::*;
        match self {
            InvalidRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            InvalidJson(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
            ),
            UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "unsupported_media_type",
            ),
            ContextLength(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "context_length_exceeded",
            ),
            Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
            ),
            Forbidden => (
                StatusCode::FORBIDDEN,
                "permission_error",
                "admin_key_required",
            ),
            AdapterNotFound(_) => (
                StatusCode::NOT_FOUND,
                "not_found_error",
                "adapter_not_found",
            ),
            ModelNotFound(_) => (StatusCode::NOT_FOUND, "not_found_error", "model_not_found"),
            AdapterExists(_) => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                "adapter_exists",
            ),
            StoreUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "adapter_store_unavailable",
            ),
            AdapterConflict(_) => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                "adapter_conflict",
            ),
            StoreCorrupt(_) => (
                StatusCode::BAD_GATEWAY,
                "server_error",
                "adapter_store_corrupt",
            ),
            AdapterInvalid { code, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                code,
            ),
            PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "payload_too_large",
            ),
            Overloaded => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "overloaded",
            ),
            Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
            ),
            Timeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "timeout_error",
                "request_timeout",
            ),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
            ),
        }
    }

    pub fn invalid(param: &'static str, msg: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            msg: msg.into(),
            param: Some(param),
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (_, kind, code) = self.parts();
        let message = match self {
            // The log has the whole message (with any backtrace); the client gets its first line.
            ApiError::Internal(m) => format!(
                "internal error: {}; the server log has the details",
                m.lines()
                    .next()
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect::<String>()
            ),
            _ => self.to_string(),
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind: kind.to_string(),
                param: match self {
                    ApiError::InvalidRequest { param, .. } => param.map(str::to_string),
                    _ => None,
                },
                code: code.to_string(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.parts();
        if status.is_server_error() {
            tracing::error!("{self}");
        }
        let mut resp = (status, axum::Json(self.body())).into_response();
        if matches!(self, ApiError::Overloaded | ApiError::StoreUnavailable(_)) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest { param, msg } => ApiError::InvalidRequest {
                msg,
                param: Some(param.as_str()),
            },
            EngineError::ModelNotFound(name) => ApiError::ModelNotFound(name),
            e @ EngineError::ContextLength { .. } => ApiError::ContextLength(e.to_string()),
            EngineError::Overloaded => ApiError::Overloaded,
            EngineError::AdapterNotFound(name) => ApiError::AdapterNotFound(name),
            EngineError::AdapterLoad { name, error } => ApiError::adapter(&error, Some(&name)),
            EngineError::ShuttingDown => ApiError::Unavailable,
            EngineError::Internal(m) => ApiError::Internal(m),
        }
    }
}

impl ApiError {
    /// The one mapping of an adapter that cannot be served, wherever it was loaded (an upload,
    /// `load_lora_adapter`, or a request that loaded it from the store): 422 with the
    /// loader's stable code, except a computation failure, which is the server's (500).
    /// `name`: the adapter, when the message should say which one failed.
    pub fn adapter(e: &AdapterError, name: Option<&str>) -> Self {
        let msg = match name {
            Some(n) => format!("adapter {n:?} failed to load: {e}"),
            None => e.to_string(),
        };
        match e {
            AdapterError::Candle(_) => ApiError::Internal(msg),
            AdapterError::StoreUnavailable(_) => ApiError::StoreUnavailable(msg),
            AdapterError::StoreCorrupt(_) => ApiError::StoreCorrupt(msg),
            AdapterError::StoreGone(n) => ApiError::AdapterNotFound(n.clone()),
            e => ApiError::AdapterInvalid {
                code: e.code(),
                msg,
            },
        }
    }

    /// A catalog verb's refusal; `name_param` is the request field that named the adapter.
    pub fn catalog(e: CatalogError, name_param: &'static str) -> Self {
        match e {
            CatalogError::InvalidName(_) => ApiError::invalid(name_param, e.to_string()),
            CatalogError::Exists(n) => ApiError::AdapterExists(n),
            CatalogError::NotFound(n) => ApiError::AdapterNotFound(n),
            CatalogError::Invalid(e) => ApiError::adapter(&e, None),
            CatalogError::PathMissing(_) | CatalogError::PathOutsideRoot(_) => {
                ApiError::invalid("lora_path", e.to_string())
            }
            CatalogError::NoRegistrationRoot => ApiError::invalid("lora_path", e.to_string()),
            CatalogError::Store(StoreError::Unavailable(_)) => {
                ApiError::StoreUnavailable(e.to_string())
            }
            CatalogError::Store(StoreError::Conflict(_)) => {
                ApiError::AdapterConflict(e.to_string())
            }
            CatalogError::Store(StoreError::Corrupt { .. }) => {
                ApiError::StoreCorrupt(e.to_string())
            }
            CatalogError::Store(StoreError::Config(_)) => {
                ApiError::invalid("config", e.to_string())
            }
            CatalogError::Store(_) | CatalogError::Root { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

//! The HTTP API: OpenAI-compatible completions and chat with an `adapter` field, adapter
//! upload and management, models, health, Prometheus metrics and the OpenAPI document.
//! Built by [`app`] so tests drive it without a socket; this layer never sees a tensor.

mod adapters;
mod chat;
mod completions;
mod deadline;
pub mod dto;
mod error;
mod generation;
mod metrics;
mod models;
pub mod openapi;
mod stream;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::engine::Engine;
pub use error::{ApiError, ErrorBody};
pub use metrics::Metrics;

/// What the HTTP layer needs to know besides the engine.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    pub max_upload_bytes: usize,
    /// Generation requests that run longer end with `request_timeout` (None: no limit).
    pub request_timeout: Option<std::time::Duration>,
}

/// Shared state of every handler: the engine (which owns the model and every adapter) and
/// what only HTTP needs.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub cfg: Arc<HttpConfig>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn new(engine: Engine, cfg: HttpConfig) -> Self {
        AppState {
            engine,
            cfg: Arc::new(cfg),
            metrics: Arc::new(Metrics::default()),
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The router.
pub fn app(state: AppState) -> Router {
    let admin = Router::new()
        .route("/v1/adapters", post(adapters::upload))
        .route(
            "/v1/adapters/{name}",
            axum::routing::delete(adapters::delete),
        )
        .route("/v1/load_lora_adapter", post(adapters::load_lora))
        .route("/v1/unload_lora_adapter", post(adapters::unload_lora))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    let generation = Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            deadline::enforce,
        ));
    let v1 = Router::new()
        .merge(generation)
        .route("/v1/models", get(models::models))
        .route("/v1/adapters", get(adapters::list))
        .route("/v1/adapters/{name}", get(adapters::get_one))
        .merge(admin)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::serve))
        .layer(DefaultBodyLimit::max(state.cfg.max_upload_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Liveness: the model is loaded and the server answers.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, body = dto::Health, description = "The server is up")))]
pub async fn health() -> Json<dto::Health> {
    Json(dto::Health { status: "ok" })
}

/// Readiness: up, and the adapter store answers. 503 while an object store is unreachable
/// (adapters cached here still serve; uploads and uncached adapters get 503
/// `adapter_store_unavailable`); the replica recovers by itself when the store returns.
#[utoipa::path(get, path = "/ready", tag = "health",
    responses((status = 200, body = dto::Ready, description = "Ready"),
              (status = 503, body = dto::Ready, description = "The adapter store is unreachable")))]
pub async fn ready(State(s): State<AppState>) -> Response {
    let h = s.engine.store_health();
    let body = dto::Ready {
        status: if h.up {
            "ready"
        } else {
            "adapter_store_unavailable"
        },
        adapter_store: dto::StoreState {
            url: h.url,
            remote: h.remote,
            up: h.up,
            error: h.error,
        },
    };
    let status = if h.up {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// Constant-time comparison, so keys cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

async fn require_api_key(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.cfg.api_key {
        let ok = bearer(&req).is_some_and(|b| {
            same(b.as_bytes(), key.as_bytes())
                || s.cfg
                    .admin_key
                    .as_ref()
                    .is_some_and(|a| same(b.as_bytes(), a.as_bytes()))
        });
        if !ok {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

async fn require_admin(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.cfg.admin_key {
        if !bearer(&req).is_some_and(|b| same(b.as_bytes(), key.as_bytes())) {
            return ApiError::Forbidden.into_response();
        }
    }
    next.run(req).await
}

/// Request counts and latency by endpoint and status.
async fn track(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let path = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let start = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .record_request(&path, resp.status().as_u16(), start.elapsed().as_secs_f64());
    resp
}

/// A JSON body whose rejections are API errors in OpenAI's shape.
pub struct JsonBody<T>(pub T);

impl<T> FromRequest<AppState> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => {
                Err(ApiError::UnsupportedMediaType("application/json"))
            }
            Err(JsonRejection::BytesRejection(e))
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::PayloadTooLarge(state.cfg.max_upload_bytes))
            }
            Err(e) => Err(ApiError::InvalidJson(e.body_text())),
        }
    }
}

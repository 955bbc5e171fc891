//! The OpenAPI document, generated from the code (`dora-serve openapi` prints it as YAML; the
//! committed `openapi.yaml` must equal it).

use axum::Json;
use utoipa::OpenApi;

use super::dto::*;
use super::error::{ErrorBody, ErrorDetail};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dora-serve",
        description = "One base LLM, many DoRA/LoRA adapters: OpenAI-compatible completions with an `adapter` field, adapter upload and management."
    ),
    paths(
        super::completions::completions,
        super::chat::chat,
        super::models::models,
        super::adapters::upload,
        super::adapters::list,
        super::adapters::get_one,
        super::adapters::delete,
        super::adapters::load_lora,
        super::adapters::unload_lora,
        super::health,
        super::ready,
    ),
    components(schemas(ErrorBody, ErrorDetail, Health, Ready, StoreState))
)]
pub struct ApiDoc;

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub fn yaml() -> String {
    document().to_yaml().unwrap_or_default()
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}

//! `GET /v1/models`: the base model and every adapter, OpenAI list format.

use axum::extract::State;
use axum::Json;

use super::dto::*;
use super::{now_secs, AppState};

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList, description = "OK")))]
pub async fn models(State(s): State<AppState>) -> Json<ModelList> {
    let created = now_secs();
    let weights = s.engine.model().weights_summary();
    let stats = s.engine.stats();
    let cfg = s.engine.model().config();
    let base = BaseDescription {
        family: cfg.family.to_string(),
        max_model_len: cfg.max_context,
        name: s.engine.info().name.clone(),
        formats: weights.to_string(),
        tensors: weights
            .formats
            .iter()
            .map(|(k, n)| (k.to_string(), *n))
            .collect(),
        weight_bytes: weights.bytes,
        kv_cache_bytes: stats.kv_bytes,
        adapter_bytes: stats.adapter_cache.bytes_resident,
        merged_bytes: stats.merged_bytes,
    };
    let mut data = vec![ModelCard {
        id: s.engine.info().id.clone(),
        object: "model",
        created,
        owned_by: "dora-serve",
        parent: None,
        kind: None,
        rank: None,
        state: None,
        base: Some(base),
    }];
    for a in super::adapters::describe_all(&s) {
        data.push(ModelCard {
            id: a.name,
            object: "model",
            created,
            owned_by: "dora-serve",
            parent: Some(s.engine.info().id.clone()),
            kind: Some(a.kind),
            rank: Some(a.r),
            state: Some(a.state),
            base: None,
        });
    }
    Json(ModelList {
        object: "list",
        data,
    })
}

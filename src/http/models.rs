//! `GET /v1/models`: the base model and every adapter, OpenAI list format.

use axum::extract::State;
use axum::Json;

use super::dto::*;
use super::{now_secs, AppState};

#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList, description = "OK")))]
pub async fn models(State(s): State<AppState>) -> Json<ModelList> {
    let created = now_secs();
    let mut data = vec![ModelCard {
        id: s.cfg.model_id.clone(),
        object: "model",
        created,
        owned_by: "dora-serve",
        parent: None,
        kind: None,
        rank: None,
        state: None,
    }];
    for a in super::adapters::describe_all(&s) {
        data.push(ModelCard {
            id: a.name,
            object: "model",
            created,
            owned_by: "dora-serve",
            parent: Some(s.cfg.model_id.clone()),
            kind: Some(a.kind),
            rank: Some(a.r),
            state: Some(a.state),
        });
    }
    Json(ModelList {
        object: "list",
        data,
    })
}

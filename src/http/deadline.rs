//! `--request-timeout`: a generation request that is still running at its deadline ends with
//! `request_timeout`. Before the response starts that is an HTTP 408; once a stream has
//! started, a final error event. Either way the request's engine streams are dropped, which
//! cancels its sequences at the next step and frees their KV memory.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use tokio::time::Instant;

use super::{ApiError, AppState};

pub(super) async fn enforce(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(limit) = s.cfg.request_timeout else {
        return next.run(req).await;
    };
    let deadline = Instant::now() + limit;
    let timeout = ApiError::Timeout(limit.as_secs());
    let resp = match tokio::time::timeout_at(deadline, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => return timeout.into_response(),
    };
    let is_stream = resp
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !is_stream {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let last = format!(
        "data: {}\n\n",
        serde_json::to_string(&timeout.body()).unwrap_or_default()
    );
    let body = stream::unfold(
        Some((body.into_data_stream(), last)),
        move |st| async move {
            let (mut body, last) = st?;
            tokio::select! {
                item = body.next() => item.map(|i| (i, Some((body, last)))),
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::info!("a streaming request reached its deadline and was cancelled");
                    Some((Ok(Bytes::from(last)), None))
                }
            }
        },
    );
    Response::from_parts(parts, Body::from_stream(body))
}

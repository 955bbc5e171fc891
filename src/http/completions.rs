//! `POST /v1/completions`: JSON or server-sent events.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::dto::*;
use super::generation::{
    finish_str, request_id, token_text, tokenize, validate, Encoding, SamplingFields,
};
use super::stream::{self, Collected, Render, TokenChunk};
use super::{now_secs, ApiError, AppState, ErrorBody, JsonBody};
use crate::engine::{
    AdapterSpec, AdapterVersion, EngineRequest, FinishReason, LogprobsAsk, Param, TokenLogprob,
};

/// OpenAI's limit on completions `logprobs`.
const MAX_COMPLETION_LOGPROBS: usize = 5;

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, description = "JSON, or server-sent events of the same objects ending in [DONE] when stream is true",
                content((CompletionResponse = "application/json"), (ServerSentEvent = "text/event-stream"))),
              (status = 400, body = ErrorBody, description = "Invalid request"), (status = 404, body = ErrorBody, description = "Not found"), (status = 415, body = ErrorBody, description = "Wrong content type"), (status = 422, body = ErrorBody, description = "The adapter failed validation"), (status = 408, body = ErrorBody, description = "The request ran past --request-timeout"), (status = 429, body = ErrorBody, description = "Overloaded; retry after Retry-After seconds")))]
pub async fn completions(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    refuse_unsupported(&req)?;
    let prompts = match req.prompt.clone() {
        Prompt::Text(t) => tokenize(&s, vec![t], Encoding::Prompt).await?,
        Prompt::Texts(ts) => tokenize(&s, ts, Encoding::Prompt).await?,
        Prompt::Tokens(ids) => vec![ids],
        Prompt::TokenLists(l) => l,
    };
    let valid = validate(&s, engine_request(&req, prompts)).await?;
    let render = Completions {
        s: s.clone(),
        id: request_id("cmpl"),
        created: now_secs(),
        model: req
            .model
            .clone()
            .unwrap_or_else(|| s.engine.info().id.clone()),
        adapter: valid.adapter_name().map(str::to_string),
        echo: req.echo.unwrap_or(false),
        logprobs: valid.logprobs().is_some(),
    };
    let started = stream::start(&s, valid).await?;
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(stream::sse(s, started, render, include_usage));
    }
    let out = stream::collect(&s, started).await?;
    Ok(Json(CompletionResponse {
        choices: out.choices.into_iter().map(|c| render.choice(c)).collect(),
        usage: Some(out.usage),
        ..render.response(vec![], out.served)
    })
    .into_response())
}

/// Fields that OpenAI has and dora-serve does not serve, refused by name.
fn refuse_unsupported(req: &CompletionRequest) -> Result<(), ApiError> {
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::invalid(
            "best_of",
            "best_of is not supported; use n",
        ));
    }
    if req.suffix.as_ref().is_some_and(|x| !x.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "suffix (insertion) is not supported",
        ));
    }
    if req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::invalid(
            "logit_bias",
            "logit_bias is not supported",
        ));
    }
    Ok(())
}

fn engine_request(req: &CompletionRequest, prompts: Vec<Vec<u32>>) -> EngineRequest {
    let logprobs = req.logprobs.map(|k| LogprobsAsk {
        top: k as usize,
        param: Param::Logprobs,
        limit: MAX_COMPLETION_LOGPROBS,
    });
    EngineRequest {
        prompts,
        n: req.n.unwrap_or(1) as usize,
        // OpenAI's default for completions.
        max_tokens: Some(req.max_tokens.map_or(16, |m| m as usize)),
        sampling: SamplingFields {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
        }
        .params(),
        prompt_logprobs: req.echo.unwrap_or(false) && logprobs.is_some(),
        logprobs,
        stop_token_ids: vec![],
        stop_strings: req.stop.clone().map(Stop::into_vec).unwrap_or_default(),
        ignore_eos: req.ignore_eos.unwrap_or(false),
        model: req.model.clone(),
        adapter: req.adapter.clone().map(AdapterSpec::Named),
    }
}

/// How a completion looks, whole or as chunks.
struct Completions {
    s: AppState,
    id: String,
    created: u64,
    model: String,
    adapter: Option<String>,
    echo: bool,
    logprobs: bool,
}

impl Completions {
    fn response(
        &self,
        choices: Vec<CompletionChoice>,
        served: Option<AdapterVersion>,
    ) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: None,
            adapter: self.adapter.clone(),
            adapter_version: served.as_ref().map(|v| v.version),
            adapter_digest: served.map(|v| v.digest),
        }
    }

    fn prompt_text(&self, prompt: &[u32]) -> String {
        self.s
            .engine
            .tokenizer()
            .decode(prompt, false)
            .unwrap_or_default()
    }

    /// A finished choice: its text (after the prompt's, with `echo`) and log-probabilities.
    fn choice(&self, c: Collected) -> CompletionChoice {
        let mut text = c.text;
        if self.echo {
            text = self.prompt_text(&c.prompt) + &text;
        }
        let logprobs = self.logprobs.then(|| {
            let mut lp = LogprobsBuilder::new(&self.s);
            if self.echo {
                let plps = c.prompt_logprobs.unwrap_or_default();
                for (i, &id) in c.prompt.iter().enumerate() {
                    lp.add(id, if i == 0 { None } else { plps.get(i - 1) });
                }
            }
            for (i, &id) in c.tokens.iter().enumerate() {
                lp.add(id, c.logprobs.get(i));
            }
            lp.out
        });
        CompletionChoice {
            text,
            index: c.index,
            logprobs,
            finish_reason: c.finish.map(finish_str),
        }
    }
}

/// Legacy log-probabilities, token by token, with text offsets.
struct LogprobsBuilder<'a> {
    s: &'a AppState,
    out: CompletionLogprobs,
    offset: usize,
}

impl<'a> LogprobsBuilder<'a> {
    fn new(s: &'a AppState) -> Self {
        Self {
            s,
            out: CompletionLogprobs::default(),
            offset: 0,
        }
    }

    fn add(&mut self, id: u32, l: Option<&TokenLogprob>) {
        let t = token_text(self.s, id);
        self.out.text_offset.push(self.offset);
        self.offset += t.len();
        self.out.tokens.push(t);
        self.out.token_logprobs.push(l.map(|l| l.logprob));
        // A map by token text, as OpenAI's: ids whose texts are equal share one key.
        self.out.top_logprobs.push(l.map(|l| {
            l.top
                .iter()
                .map(|x| (token_text(self.s, x.token_id), x.logprob))
                .collect::<BTreeMap<_, _>>()
        }));
    }
}

impl Render for Completions {
    type Chunk = CompletionResponse;

    fn token(&self, t: TokenChunk<'_>) -> CompletionResponse {
        let mut text = t.text;
        if t.first && self.echo {
            text = self.prompt_text(t.prompt) + &text;
        }
        let logprobs = t.logprob.map(|l| {
            let mut lp = LogprobsBuilder::new(&self.s);
            lp.add(t.token_id, Some(&l));
            lp.out
        });
        let choice = CompletionChoice {
            text,
            index: t.index,
            logprobs,
            finish_reason: None,
        };
        self.response(vec![choice], None)
    }

    fn finish(
        &self,
        index: usize,
        text: String,
        reason: FinishReason,
        served: Option<AdapterVersion>,
    ) -> CompletionResponse {
        let choice = CompletionChoice {
            text,
            index,
            logprobs: None,
            finish_reason: Some(finish_str(reason)),
        };
        self.response(vec![choice], served)
    }

    fn usage(&self, usage: Usage) -> CompletionResponse {
        CompletionResponse {
            usage: Some(usage),
            ..self.response(vec![], None)
        }
    }
}

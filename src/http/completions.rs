//! `POST /v1/completions`: JSON or server-sent events.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};

use super::dto::*;
use super::generation::{
    common, finish_str, merged_events, request_id, sse_json, start, token_text, tokenize, Choice,
};
use super::{now_secs, ApiError, AppState, ErrorBody, JsonBody};
use crate::engine::{AdapterVersion, Event, TokenLogprob};

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, body = CompletionResponse, description = "JSON, or server-sent events of the same objects ending in [DONE] when stream is true"),
              (status = 400, body = ErrorBody, description = "Invalid request"), (status = 404, body = ErrorBody, description = "Not found"), (status = 415, body = ErrorBody, description = "Wrong content type"), (status = 422, body = ErrorBody, description = "The adapter failed validation"), (status = 408, body = ErrorBody, description = "The request ran past --request-timeout"), (status = 429, body = ErrorBody, description = "Overloaded; retry after Retry-After seconds")))]
pub async fn completions(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
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
    let logprobs = req.logprobs.map(|k| k as usize);
    if logprobs.is_some_and(|k| k > 5) {
        return Err(ApiError::invalid(
            "logprobs",
            "logprobs must be between 0 and 5",
        ));
    }
    let c = common(
        &s,
        req.model.as_deref(),
        req.adapter.as_deref(),
        req.max_tokens,
        req.temperature,
        req.top_p,
        req.top_k,
        req.n,
        req.stop,
        req.seed,
        req.presence_penalty,
        req.frequency_penalty,
        req.ignore_eos,
        16,
    )?;
    let vocab = s.engine.model().config().vocab_size;
    let prompts: Vec<Vec<u32>> = match req.prompt {
        Prompt::Text(t) => tokenize(&s, vec![t]).await?,
        Prompt::Texts(ts) => tokenize(&s, ts).await?,
        Prompt::Tokens(ids) => vec![ids],
        Prompt::TokenLists(l) => l,
    };
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if prompts.len() * c.n > 64 {
        return Err(ApiError::invalid(
            "prompt",
            "at most 64 completions (prompts × n) per request",
        ));
    }
    if let Some(t) = prompts.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!("token id {t} is outside the vocabulary (0..{vocab})"),
        ));
    }
    let echo = req.echo.unwrap_or(false);
    let stream = req.stream.unwrap_or(false);
    let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
    let model = req.model.clone().unwrap_or_else(|| s.cfg.model_id.clone());
    let started = Instant::now();
    let choices = start(&s, &c, prompts, logprobs, echo && logprobs.is_some()).await?;
    let id = request_id("cmpl");
    let created = now_secs();
    if stream {
        let events = completion_stream(
            s,
            choices,
            CompletionMeta {
                id,
                created,
                model,
                adapter: c.adapter,
                echo,
                include_usage,
                started,
            },
        );
        return Ok(Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut out = Vec::new();
    let (mut prompt_tokens, mut completion_tokens, mut version) = (0, 0, None);
    for mut ch in choices {
        let mut acc = Acc::default();
        let mut ev = ch.first.take();
        let mut first_token = true;
        while let Some(e) = ev.take() {
            match e {
                Event::PromptLogprobs(lps) => acc.prompt_lps = Some(lps),
                Event::Token {
                    token_id,
                    text,
                    logprob,
                } => {
                    if first_token {
                        s.metrics.observe_ttft(started.elapsed().as_secs_f64());
                        first_token = false;
                    }
                    acc.push(&s, token_id, &text, logprob);
                }
                Event::Done {
                    finish_reason,
                    prompt_tokens: p,
                    completion_tokens: n,
                    adapter,
                    text,
                } => {
                    acc.text.push_str(&text);
                    acc.finish = Some(finish_str(finish_reason));
                    prompt_tokens += p;
                    completion_tokens += n;
                    version = adapter;
                    break;
                }
                Event::Error(e) => return Err(e.into()),
            }
            ev = ch.stream.next().await;
            if ev.is_none() {
                return Err(ApiError::Unavailable);
            }
        }
        s.metrics.record_tokens(
            ch.prompt.len(),
            acc.tokens.len(),
            started.elapsed().as_secs_f64(),
        );
        out.push(acc.into_choice(&s, ch.index, &ch.prompt, echo, logprobs.is_some()));
    }
    out.sort_by_key(|c| c.index);
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model,
        choices: out,
        usage: Some(Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }),
        adapter: c.adapter,
        adapter_version: version.as_ref().map(|v| v.version),
        adapter_digest: version.map(|v| v.digest),
    })
    .into_response())
}

/// A completion choice as it accumulates.
#[derive(Default)]
struct Acc {
    text: String,
    tokens: Vec<u32>,
    lps: Vec<TokenLogprob>,
    prompt_lps: Option<Vec<TokenLogprob>>,
    finish: Option<String>,
}

impl Acc {
    fn push(&mut self, _s: &AppState, token_id: u32, text: &str, lp: Option<TokenLogprob>) {
        self.tokens.push(token_id);
        self.text.push_str(text);
        if let Some(lp) = lp {
            self.lps.push(lp);
        }
    }

    fn into_choice(
        self,
        s: &AppState,
        index: usize,
        prompt: &[u32],
        echo: bool,
        want_lps: bool,
    ) -> CompletionChoice {
        let mut text = self.text;
        let mut logprobs = None;
        if echo {
            let prompt_text = s
                .engine
                .tokenizer()
                .decode(prompt, false)
                .unwrap_or_default();
            text = prompt_text + &text;
        }
        if want_lps {
            let mut lp = CompletionLogprobs::default();
            let mut offset = 0;
            let mut add = |id: u32, l: Option<&TokenLogprob>| {
                let t = token_text(s, id);
                lp.text_offset.push(offset);
                offset += t.len();
                lp.tokens.push(t);
                lp.token_logprobs.push(l.map(|l| l.logprob));
                lp.top_logprobs.push(l.map(|l| {
                    l.top
                        .iter()
                        .map(|x| (token_text(s, x.token_id), x.logprob))
                        .collect::<BTreeMap<_, _>>()
                }));
            };
            if echo {
                let plps = self.prompt_lps.unwrap_or_default();
                for (i, &id) in prompt.iter().enumerate() {
                    add(id, if i == 0 { None } else { plps.get(i - 1) });
                }
            }
            for (i, &id) in self.tokens.iter().enumerate() {
                add(id, self.lps.get(i));
            }
            logprobs = Some(lp);
        }
        CompletionChoice {
            text,
            index,
            logprobs,
            finish_reason: self.finish,
        }
    }
}

struct CompletionMeta {
    id: String,
    created: u64,
    model: String,
    adapter: Option<String>,
    echo: bool,
    include_usage: bool,
    started: Instant,
}

fn completion_stream(
    s: AppState,
    choices: Vec<Choice>,
    meta: CompletionMeta,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    let remaining = choices.len();
    let events = merged_events(choices);
    let state = (
        events,
        s,
        meta,
        remaining,
        0usize,
        0usize,
        false,
        std::collections::HashSet::<usize>::new(),
    );
    stream::unfold(
        state,
        |(mut events, s, meta, mut remaining, mut pt, mut ct, mut done, mut started)| async move {
            if done {
                return None;
            }
            let chunk =
                |index: usize,
                 text: String,
                 lp: Option<CompletionLogprobs>,
                 finish: Option<String>,
                 served: Option<AdapterVersion>| CompletionResponse {
                    id: meta.id.clone(),
                    object: "text_completion",
                    created: meta.created,
                    model: meta.model.clone(),
                    choices: vec![CompletionChoice {
                        text,
                        index,
                        logprobs: lp,
                        finish_reason: finish,
                    }],
                    usage: None,
                    adapter: meta.adapter.clone(),
                    adapter_version: served.as_ref().map(|v| v.version),
                    adapter_digest: served.map(|v| v.digest),
                };
            loop {
                if remaining == 0 {
                    done = true;
                    let mut out = Vec::new();
                    if meta.include_usage {
                        let usage = CompletionResponse {
                            id: meta.id.clone(),
                            object: "text_completion",
                            created: meta.created,
                            model: meta.model.clone(),
                            choices: vec![],
                            usage: Some(Usage {
                                prompt_tokens: pt,
                                completion_tokens: ct,
                                total_tokens: pt + ct,
                            }),
                            adapter: meta.adapter.clone(),
                            adapter_version: None,
                            adapter_digest: None,
                        };
                        out.push(sse_json(&usage));
                    }
                    out.push(Ok(SseEvent::default().data("[DONE]")));
                    return Some((
                        stream::iter(out),
                        (events, s, meta, remaining, pt, ct, done, started),
                    ));
                }
                let Some((index, prompt, ev)) = events.next().await else {
                    remaining = 0;
                    continue;
                };
                let item = match ev {
                    Event::PromptLogprobs(_) => continue,
                    Event::Token {
                        token_id,
                        text,
                        logprob,
                    } => {
                        let mut text = text;
                        if started.insert(index) {
                            s.metrics.observe_ttft(meta.started.elapsed().as_secs_f64());
                            if meta.echo {
                                text = s
                                    .engine
                                    .tokenizer()
                                    .decode(&prompt, false)
                                    .unwrap_or_default()
                                    + &text;
                            }
                        }
                        let lp = logprob.map(|l| CompletionLogprobs {
                            tokens: vec![token_text(&s, token_id)],
                            token_logprobs: vec![Some(l.logprob)],
                            top_logprobs: vec![Some(
                                l.top
                                    .iter()
                                    .map(|x| (token_text(&s, x.token_id), x.logprob))
                                    .collect(),
                            )],
                            text_offset: vec![0],
                        });
                        sse_json(&chunk(index, text, lp, None, None))
                    }
                    Event::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                        text,
                        adapter,
                    } => {
                        remaining -= 1;
                        pt += prompt_tokens;
                        ct += completion_tokens;
                        s.metrics.record_tokens(
                            prompt_tokens,
                            completion_tokens,
                            meta.started.elapsed().as_secs_f64(),
                        );
                        sse_json(&chunk(
                            index,
                            text,
                            None,
                            Some(finish_str(finish_reason)),
                            adapter,
                        ))
                    }
                    Event::Error(e) => {
                        remaining -= 1;
                        sse_json(&ApiError::from(e).body())
                    }
                };
                return Some((
                    stream::iter(vec![item]),
                    (events, s, meta, remaining, pt, ct, done, started),
                ));
            }
        },
    )
    .flatten()
}

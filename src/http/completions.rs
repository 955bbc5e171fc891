//! `POST /v1/completions`, `POST /v1/chat/completions` (JSON or server-sent events) and
//! `GET /v1/models`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};

use super::dto::*;
use super::{now_secs, ApiError, AppState, ErrorBody, JsonBody};
use crate::engine::{
    AdapterSpec, EngineRequest, Event, EventStream, FinishReason, SamplingParams, TokenLogprob,
    MAX_LOGPROBS,
};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:x}{:08x}",
        now_secs(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// The adapter a request names through `adapter` and/or `model` (vLLM style).
fn resolve_adapter(
    s: &AppState,
    model: Option<&str>,
    adapter: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let from_model = match model {
        None | Some("") => None,
        Some(m) if m == s.cfg.model_id => None,
        Some(m) if s.adapter_exists(m) => Some(m.to_string()),
        Some(m) => {
            return Err(if adapter.is_none() {
                ApiError::ModelNotFound(m.to_string())
            } else {
                ApiError::invalid(
                    "model",
                    format!(
                        "model {m:?} is neither the base model {:?} nor an adapter",
                        s.cfg.model_id
                    ),
                )
            })
        }
    };
    match (from_model, adapter) {
        (Some(m), Some(a)) if m != a => Err(ApiError::invalid(
            "adapter",
            format!("model names adapter {m:?} but adapter names {a:?}: name one adapter"),
        )),
        (_, Some(a)) if !s.adapter_exists(a) => Err(ApiError::AdapterNotFound(a.to_string())),
        (_, Some(a)) => Ok(Some(a.to_string())),
        (m, None) => Ok(m),
    }
}

/// What completions and chat share, validated.
struct Common {
    sampling: SamplingParams,
    max_tokens: usize,
    n: usize,
    stop: Vec<String>,
    adapter: Option<String>,
    ignore_eos: bool,
}

#[allow(clippy::too_many_arguments)]
fn common(
    s: &AppState,
    model: Option<&str>,
    adapter: Option<&str>,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u32>,
    n: Option<u32>,
    stop: Option<Stop>,
    seed: Option<u64>,
    presence: Option<f64>,
    frequency: Option<f64>,
    ignore_eos: Option<bool>,
    default_max_tokens: usize,
) -> Result<Common, ApiError> {
    let adapter = resolve_adapter(s, model, adapter)?;
    let n = n.unwrap_or(1) as usize;
    if !(1..=16).contains(&n) {
        return Err(ApiError::invalid(
            "n",
            format!("n must be between 1 and 16, got {n}"),
        ));
    }
    let stop = stop.map(Stop::into_vec).unwrap_or_default();
    if stop.len() > 4 || stop.iter().any(|x| x.is_empty()) {
        return Err(ApiError::invalid(
            "stop",
            "give at most 4 non-empty stop strings",
        ));
    }
    let sampling = SamplingParams {
        temperature: temperature.unwrap_or(1.0),
        top_p: top_p.unwrap_or(1.0),
        top_k: top_k.map(|k| k as usize),
        // Without a seed each request draws its own.
        seed: seed.unwrap_or_else(|| {
            now_secs()
                ^ NEXT_ID
                    .fetch_add(1, Ordering::Relaxed)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        }),
        presence_penalty: presence.unwrap_or(0.0),
        frequency_penalty: frequency.unwrap_or(0.0),
    };
    sampling.check().map_err(|m| {
        let param = [
            "temperature",
            "top_p",
            "top_k",
            "presence_penalty",
            "frequency_penalty",
        ]
        .into_iter()
        .find(|p| m.starts_with(p))
        .unwrap_or("temperature");
        ApiError::invalid(param, m)
    })?;
    Ok(Common {
        sampling,
        max_tokens: max_tokens.map_or(default_max_tokens, |m| m as usize),
        n,
        stop,
        adapter,
        ignore_eos: ignore_eos.unwrap_or(false),
    })
}

/// One choice being generated.
struct Choice {
    index: usize,
    prompt: Vec<u32>,
    stream: EventStream,
    /// An event read ahead to catch load errors before answering.
    first: Option<Event>,
}

/// Submit every (prompt, n) choice; wait for each one's first event so that errors (adapter
/// load failures) become HTTP errors rather than broken streams.
async fn start(
    s: &AppState,
    c: &Common,
    prompts: Vec<Vec<u32>>,
    logprobs: Option<usize>,
    echo_logprobs: bool,
) -> Result<Vec<Choice>, ApiError> {
    let mut choices = Vec::with_capacity(prompts.len() * c.n);
    for (pi, prompt) in prompts.into_iter().enumerate() {
        for k in 0..c.n {
            let mut sampling = c.sampling.clone();
            sampling.seed = sampling.seed.wrapping_add(k as u64);
            let stream = s.engine.submit(EngineRequest {
                prompt_token_ids: prompt.clone(),
                max_tokens: c.max_tokens,
                sampling,
                logprobs,
                stop_token_ids: vec![],
                stop_strings: c.stop.clone(),
                ignore_eos: c.ignore_eos,
                adapter: c.adapter.clone().map(AdapterSpec::Named),
                prompt_logprobs: if echo_logprobs { logprobs } else { None },
            })?;
            choices.push(Choice {
                index: pi * c.n + k,
                prompt: prompt.clone(),
                stream,
                first: None,
            });
        }
    }
    for ch in choices.iter_mut() {
        match ch.stream.next().await {
            Some(Event::Error(e)) => return Err(e.into()),
            Some(ev) => ch.first = Some(ev),
            None => return Err(ApiError::Unavailable),
        }
    }
    Ok(choices)
}

async fn tokenize(s: &AppState, texts: Vec<String>) -> Result<Vec<Vec<u32>>, ApiError> {
    let tok = std::sync::Arc::clone(s.engine.tokenizer());
    tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|t| {
                tok.encode(t)
                    .map_err(|e| ApiError::invalid("prompt", e.to_string()))
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

fn token_text(s: &AppState, id: u32) -> String {
    s.engine
        .tokenizer()
        .decode(&[id], false)
        .unwrap_or_default()
}

fn finish_str(r: FinishReason) -> String {
    match r {
        FinishReason::Stop => "stop".into(),
        FinishReason::Length => "length".into(),
    }
}

#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, body = CompletionResponse, description = "JSON, or server-sent events of the same objects ending in [DONE] when stream is true"),
              (status = 400, body = ErrorBody, description = "Invalid request"), (status = 404, body = ErrorBody, description = "Not found"), (status = 422, body = ErrorBody, description = "The adapter failed validation"), (status = 429, body = ErrorBody, description = "Overloaded; retry after Retry-After seconds")))]
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
                    version = adapter.map(|a| a.version);
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
        adapter_version: version,
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

/// Merge the choices' events into one event stream (choices interleave as tokens arrive).
fn merged_events(choices: Vec<Choice>) -> impl Stream<Item = (usize, Vec<u32>, Event)> + Send {
    let per_choice = choices.into_iter().map(|mut ch| {
        let first = ch.first.take();
        let (index, prompt) = (ch.index, ch.prompt.clone());
        stream::iter(first)
            .chain(stream::unfold(ch.stream, |mut s| async move {
                s.next().await.map(|e| (e, s))
            }))
            .map(move |e| (index, prompt.clone(), e))
            .boxed()
    });
    stream::select_all(per_choice)
}

fn sse_json<T: serde::Serialize>(v: &T) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(serde_json::to_string(v).unwrap_or_default()))
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
            let chunk = |index: usize,
                         text: String,
                         lp: Option<CompletionLogprobs>,
                         finish: Option<String>| CompletionResponse {
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
                adapter_version: None,
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
                        sse_json(&chunk(index, text, lp, None))
                    }
                    Event::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                        text,
                        ..
                    } => {
                        remaining -= 1;
                        pt += prompt_tokens;
                        ct += completion_tokens;
                        s.metrics.record_tokens(
                            prompt_tokens,
                            completion_tokens,
                            meta.started.elapsed().as_secs_f64(),
                        );
                        sse_json(&chunk(index, text, None, Some(finish_str(finish_reason))))
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

/// Render the model's chat template.
fn render_chat(s: &AppState, messages: &[ChatMessage]) -> Result<String, ApiError> {
    let template = s.engine.info().chat_template.clone().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "the model has no chat template; use /v1/completions",
        )
    })?;
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "give at least one message"));
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for m in messages {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::invalid(
                "messages",
                format!("unknown role {:?}", m.role),
            ));
        }
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut out = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        (k, _) => {
                            return Err(ApiError::invalid(
                                "messages",
                                format!("content part type {k:?} is not supported (text only)"),
                            ))
                        }
                    }
                }
                out
            }
        };
        let role = if m.role == "developer" {
            "system"
        } else {
            m.role.as_str()
        };
        msgs.push(minijinja::context! { role => role, content => content });
    }
    let tok = s.engine.tokenizer();
    let info = s.engine.info();
    let token = |id: Option<u32>| {
        id.and_then(|i| tok.decode(&[i], false).ok())
            .unwrap_or_default()
    };
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", &template).map_err(|e| {
        ApiError::Internal(format!("the model's chat template does not parse: {e}"))
    })?;
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => msgs,
                add_generation_prompt => true,
                bos_token => token(info.bos_token_id),
                eos_token => token(info.eos_token_ids.first().copied()),
            })
        })
        .map_err(|e| {
            ApiError::invalid(
                "messages",
                format!("the chat template rejected the messages: {e}"),
            )
        })
}

#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatRequest,
    responses((status = 200, body = ChatResponse, description = "JSON, or server-sent ChatChunk events ending in [DONE] when stream is true"),
              (status = 400, body = ErrorBody, description = "Invalid request"), (status = 404, body = ErrorBody, description = "Not found"), (status = 422, body = ErrorBody, description = "The adapter failed validation"), (status = 429, body = ErrorBody, description = "Overloaded; retry after Retry-After seconds")))]
pub async fn chat(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    if req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::invalid(
            "logit_bias",
            "logit_bias is not supported",
        ));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::invalid("tools", "tool calling is not supported"));
    }
    let top = req.top_logprobs.map(|k| k as usize);
    if top.is_some_and(|k| k > MAX_LOGPROBS) {
        return Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs must be between 0 and 20",
        ));
    }
    let logprobs = req.logprobs.unwrap_or(false).then(|| top.unwrap_or(0));
    let max = req.max_completion_tokens.or(req.max_tokens);
    let ctx = s.engine.model().config().max_context;
    let prompt_text = render_chat(&s, &req.messages)?;
    let prompt = tokenize(&s, vec![prompt_text]).await?.remove(0);
    // Without max_tokens a chat reply may use the rest of the context.
    let default_max = ctx.saturating_sub(prompt.len()).max(1);
    let c = common(
        &s,
        req.model.as_deref(),
        req.adapter.as_deref(),
        max,
        req.temperature,
        req.top_p,
        req.top_k,
        req.n,
        req.stop,
        req.seed,
        req.presence_penalty,
        req.frequency_penalty,
        req.ignore_eos,
        default_max,
    )?;
    let model = req.model.clone().unwrap_or_else(|| s.cfg.model_id.clone());
    let started = Instant::now();
    let choices = start(&s, &c, vec![prompt], logprobs, false).await?;
    let id = request_id("chatcmpl");
    let created = now_secs();
    let chat_lp = |s: &AppState, l: &TokenLogprob| {
        let token = token_text(s, l.token_id);
        ChatTokenLogprob {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob: l.logprob,
            top_logprobs: l
                .top
                .iter()
                .map(|x| {
                    let t = token_text(s, x.token_id);
                    ChatTopLogprob {
                        bytes: t.as_bytes().to_vec(),
                        token: t,
                        logprob: x.logprob,
                    }
                })
                .collect(),
        }
    };
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let remaining = choices.len();
        let indices: Vec<usize> = choices.iter().map(|c| c.index).collect();
        let chunk = {
            let (id, model, adapter) = (id.clone(), model.clone(), c.adapter.clone());
            move |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatChunk {
                id: id.clone(),
                object: "chat.completion.chunk",
                created,
                model: model.clone(),
                choices,
                usage,
                adapter: adapter.clone(),
            }
        };
        // The role first, for every choice, as OpenAI does.
        let opening: Vec<Result<SseEvent, Infallible>> = indices
            .iter()
            .map(|&index| {
                sse_json(&chunk(
                    vec![ChatChunkChoice {
                        index,
                        delta: ChatDelta {
                            role: Some("assistant"),
                            content: Some(String::new()),
                        },
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                ))
            })
            .collect();
        let events = merged_events(choices);
        let st = (events, s, remaining, 0usize, 0usize, false, false);
        let body = stream::unfold(
            st,
            move |(mut events, s, mut remaining, mut pt, mut ct, mut done, mut seen_token)| {
                let chunk = chunk.clone();
                async move {
                    if done {
                        return None;
                    }
                    loop {
                        if remaining == 0 {
                            done = true;
                            let mut out = Vec::new();
                            if include_usage {
                                out.push(sse_json(&chunk(
                                    vec![],
                                    Some(Usage {
                                        prompt_tokens: pt,
                                        completion_tokens: ct,
                                        total_tokens: pt + ct,
                                    }),
                                )));
                            }
                            out.push(Ok(SseEvent::default().data("[DONE]")));
                            return Some((
                                stream::iter(out),
                                (events, s, remaining, pt, ct, done, seen_token),
                            ));
                        }
                        let Some((index, _, ev)) = events.next().await else {
                            remaining = 0;
                            continue;
                        };
                        let item = match ev {
                            Event::PromptLogprobs(_) => continue,
                            Event::Token { text, logprob, .. } => {
                                if !seen_token {
                                    seen_token = true;
                                    s.metrics.observe_ttft(started.elapsed().as_secs_f64());
                                }
                                let lp = logprob.map(|l| ChatLogprobs {
                                    content: vec![chat_lp(&s, &l)],
                                });
                                sse_json(&chunk(
                                    vec![ChatChunkChoice {
                                        index,
                                        delta: ChatDelta {
                                            role: None,
                                            content: Some(text),
                                        },
                                        logprobs: lp,
                                        finish_reason: None,
                                    }],
                                    None,
                                ))
                            }
                            Event::Done {
                                finish_reason,
                                prompt_tokens,
                                completion_tokens,
                                text,
                                ..
                            } => {
                                remaining -= 1;
                                pt += prompt_tokens;
                                ct += completion_tokens;
                                s.metrics.record_tokens(
                                    prompt_tokens,
                                    completion_tokens,
                                    started.elapsed().as_secs_f64(),
                                );
                                sse_json(&chunk(
                                    vec![ChatChunkChoice {
                                        index,
                                        delta: ChatDelta {
                                            role: None,
                                            content: Some(text),
                                        },
                                        logprobs: None,
                                        finish_reason: Some(finish_str(finish_reason)),
                                    }],
                                    None,
                                ))
                            }
                            Event::Error(e) => {
                                remaining -= 1;
                                sse_json(&ApiError::from(e).body())
                            }
                        };
                        return Some((
                            stream::iter(vec![item]),
                            (events, s, remaining, pt, ct, done, seen_token),
                        ));
                    }
                }
            },
        )
        .flatten();
        let all = stream::iter(opening).chain(body);
        return Ok(Sse::new(all)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let mut out = Vec::new();
    let (mut pt, mut ct, mut version) = (0, 0, None);
    for mut ch in choices {
        let mut text = String::new();
        let mut lps = Vec::new();
        let mut finish = None;
        let mut ev = ch.first.take();
        let mut first = true;
        while let Some(e) = ev.take() {
            match e {
                Event::PromptLogprobs(_) => {}
                Event::Token {
                    text: t, logprob, ..
                } => {
                    if first {
                        s.metrics.observe_ttft(started.elapsed().as_secs_f64());
                        first = false;
                    }
                    text.push_str(&t);
                    if let Some(l) = logprob {
                        lps.push(chat_lp(&s, &l));
                    }
                }
                Event::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    adapter,
                    text: t,
                } => {
                    text.push_str(&t);
                    finish = Some(finish_str(finish_reason));
                    pt += prompt_tokens;
                    ct += completion_tokens;
                    version = adapter.map(|a| a.version);
                    s.metrics.record_tokens(
                        prompt_tokens,
                        completion_tokens,
                        started.elapsed().as_secs_f64(),
                    );
                    break;
                }
                Event::Error(e) => return Err(e.into()),
            }
            ev = ch.stream.next().await;
            if ev.is_none() {
                return Err(ApiError::Unavailable);
            }
        }
        out.push(ChatChoice {
            index: ch.index,
            message: AssistantMessage {
                role: "assistant",
                content: text,
            },
            logprobs: logprobs.map(|_| ChatLogprobs { content: lps }),
            finish_reason: finish,
        });
    }
    Ok(Json(ChatResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices: out,
        usage: Usage {
            prompt_tokens: pt,
            completion_tokens: ct,
            total_tokens: pt + ct,
        },
        adapter: c.adapter,
        adapter_version: version,
    })
    .into_response())
}

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

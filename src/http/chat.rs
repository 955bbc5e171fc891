//! `POST /v1/chat/completions`: the model's chat template, JSON or server-sent events.

use std::convert::Infallible;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, StreamExt};

use super::dto::*;
use super::generation::{
    common, finish_str, merged_events, request_id, sse_json, start, token_text, tokenize,
};
use super::{now_secs, ApiError, AppState, ErrorBody, JsonBody};
use crate::engine::{AdapterVersion, Event, TokenLogprob, MAX_LOGPROBS};

/// Render the model's chat template.
/// One choice of a streamed chat chunk.
fn delta_choice(
    index: usize,
    role: Option<&'static str>,
    content: String,
    logprobs: Option<ChatLogprobs>,
    finish_reason: Option<String>,
) -> ChatChunkChoice {
    ChatChunkChoice {
        index,
        delta: ChatDelta {
            role,
            content: Some(content),
        },
        logprobs,
        finish_reason,
    }
}

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
              (status = 400, body = ErrorBody, description = "Invalid request"), (status = 404, body = ErrorBody, description = "Not found"), (status = 415, body = ErrorBody, description = "Wrong content type"), (status = 422, body = ErrorBody, description = "The adapter failed validation"), (status = 408, body = ErrorBody, description = "The request ran past --request-timeout"), (status = 429, body = ErrorBody, description = "Overloaded; retry after Retry-After seconds")))]
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
            move |choices: Vec<ChatChunkChoice>,
                  usage: Option<Usage>,
                  served: Option<AdapterVersion>| ChatChunk {
                id: id.clone(),
                object: "chat.completion.chunk",
                created,
                model: model.clone(),
                choices,
                usage,
                adapter: adapter.clone(),
                adapter_version: served.as_ref().map(|v| v.version),
                adapter_digest: served.map(|v| v.digest),
            }
        };
        // The role first, for every choice, as OpenAI does.
        let opening: Vec<Result<SseEvent, Infallible>> = indices
            .iter()
            .map(|&index| {
                sse_json(&chunk(
                    vec![delta_choice(
                        index,
                        Some("assistant"),
                        String::new(),
                        None,
                        None,
                    )],
                    None,
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
                                    None,
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
                                    vec![delta_choice(index, None, text, lp, None)],
                                    None,
                                    None,
                                ))
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
                                    started.elapsed().as_secs_f64(),
                                );
                                sse_json(&chunk(
                                    vec![delta_choice(
                                        index,
                                        None,
                                        text,
                                        None,
                                        Some(finish_str(finish_reason)),
                                    )],
                                    None,
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
                    version = adapter;
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
        adapter_version: version.as_ref().map(|v| v.version),
        adapter_digest: version.map(|v| v.digest),
    })
    .into_response())
}

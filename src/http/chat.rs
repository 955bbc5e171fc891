//! `POST /v1/chat/completions`: the model's chat template, JSON or server-sent events.

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
    MAX_LOGPROBS,
};

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
    // Real templates call Python's string methods (Qwen's `.startswith`, `.strip`, …).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
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
    responses((status = 200, description = "JSON, or server-sent ChatChunk events ending in [DONE] when stream is true",
                content((ChatResponse = "application/json"), (ServerSentEvent = "text/event-stream"))),
              (status = 400, body = ErrorBody, description = "Invalid request"), (status = 404, body = ErrorBody, description = "Not found"), (status = 415, body = ErrorBody, description = "Wrong content type"), (status = 422, body = ErrorBody, description = "The adapter failed validation"), (status = 408, body = ErrorBody, description = "The request ran past --request-timeout"), (status = 429, body = ErrorBody, description = "Overloaded; retry after Retry-After seconds")))]
pub async fn chat(
    State(s): State<AppState>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    refuse_unsupported(&req)?;
    let prompt_text = render_chat(&s, &req.messages)?;
    let prompt = tokenize(&s, vec![prompt_text], Encoding::Rendered)
        .await?
        .remove(0);
    let valid = validate(&s, engine_request(&req, prompt)).await?;
    let render = Chat {
        s: s.clone(),
        id: request_id("chatcmpl"),
        created: now_secs(),
        model: req
            .model
            .clone()
            .unwrap_or_else(|| s.engine.info().id.clone()),
        adapter: valid.adapter_name().map(str::to_string),
        logprobs: valid.logprobs().is_some(),
    };
    let started = stream::start(&s, valid).await?;
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        return Ok(stream::sse(s, started, render, include_usage));
    }
    let out = stream::collect(&s, started).await?;
    Ok(Json(ChatResponse {
        id: render.id.clone(),
        object: "chat.completion",
        created: render.created,
        model: render.model.clone(),
        choices: out.choices.into_iter().map(|c| render.choice(c)).collect(),
        usage: out.usage,
        adapter: render.adapter.clone(),
        adapter_version: out.served.as_ref().map(|v| v.version),
        adapter_digest: out.served.map(|v| v.digest),
    })
    .into_response())
}

/// Fields that OpenAI has and dora-serve does not serve, refused by name.
fn refuse_unsupported(req: &ChatRequest) -> Result<(), ApiError> {
    if req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::invalid(
            "logit_bias",
            "logit_bias is not supported",
        ));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_null()) {
        return Err(ApiError::invalid("tools", "tool calling is not supported"));
    }
    Ok(())
}

fn engine_request(req: &ChatRequest, prompt: Vec<u32>) -> EngineRequest {
    let logprobs = req.logprobs.unwrap_or(false).then(|| LogprobsAsk {
        top: req.top_logprobs.unwrap_or(0) as usize,
        param: Param::TopLogprobs,
        limit: MAX_LOGPROBS,
    });
    EngineRequest {
        prompts: vec![prompt],
        n: req.n.unwrap_or(1) as usize,
        // Without a limit a chat reply may use the rest of the context.
        max_tokens: req
            .max_completion_tokens
            .or(req.max_tokens)
            .map(|m| m as usize),
        sampling: SamplingFields {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            seed: req.seed,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
        }
        .params(),
        logprobs,
        prompt_logprobs: false,
        stop_token_ids: vec![],
        stop_strings: req.stop.clone().map(Stop::into_vec).unwrap_or_default(),
        ignore_eos: req.ignore_eos.unwrap_or(false),
        model: req.model.clone(),
        adapter: req.adapter.clone().map(AdapterSpec::Named),
    }
}

/// How a chat completion looks, whole or as chunks.
struct Chat {
    s: AppState,
    id: String,
    created: u64,
    model: String,
    adapter: Option<String>,
    logprobs: bool,
}

impl Chat {
    fn chunk(
        &self,
        choices: Vec<ChatChunkChoice>,
        usage: Option<Usage>,
        served: Option<AdapterVersion>,
    ) -> ChatChunk {
        ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            adapter: self.adapter.clone(),
            adapter_version: served.as_ref().map(|v| v.version),
            adapter_digest: served.map(|v| v.digest),
        }
    }

    fn logprob(&self, l: &TokenLogprob) -> ChatTokenLogprob {
        let token = token_text(&self.s, l.token_id);
        ChatTokenLogprob {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob: l.logprob,
            top_logprobs: l
                .top
                .iter()
                .map(|x| {
                    let t = token_text(&self.s, x.token_id);
                    ChatTopLogprob {
                        bytes: t.as_bytes().to_vec(),
                        token: t,
                        logprob: x.logprob,
                    }
                })
                .collect(),
        }
    }

    fn choice(&self, c: Collected) -> ChatChoice {
        ChatChoice {
            index: c.index,
            message: AssistantMessage {
                role: "assistant",
                content: c.text,
            },
            logprobs: self.logprobs.then(|| ChatLogprobs {
                content: c.logprobs.iter().map(|l| self.logprob(l)).collect(),
            }),
            finish_reason: c.finish.map(finish_str),
        }
    }
}

impl Render for Chat {
    type Chunk = ChatChunk;

    /// The role first, for every choice, as OpenAI does.
    fn opening(&self, indices: &[usize]) -> Vec<ChatChunk> {
        indices
            .iter()
            .map(|&index| {
                let role = delta_choice(index, Some("assistant"), String::new(), None, None);
                self.chunk(vec![role], None, None)
            })
            .collect()
    }

    fn token(&self, t: TokenChunk<'_>) -> ChatChunk {
        let lp = t.logprob.map(|l| ChatLogprobs {
            content: vec![self.logprob(&l)],
        });
        self.chunk(
            vec![delta_choice(t.index, None, t.text, lp, None)],
            None,
            None,
        )
    }

    fn finish(
        &self,
        index: usize,
        text: String,
        reason: FinishReason,
        served: Option<AdapterVersion>,
    ) -> ChatChunk {
        let choice = delta_choice(index, None, text, None, Some(finish_str(reason)));
        self.chunk(vec![choice], None, served)
    }

    fn usage(&self, usage: Usage) -> ChatChunk {
        self.chunk(vec![], Some(usage), None)
    }
}

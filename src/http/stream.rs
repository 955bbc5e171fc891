//! What completions and chat share once a request is validated: submitting its choices,
//! then either collecting them into one response or streaming them as server-sent events.
//! Each endpoint says only how its chunks look ([`Render`]); the event loop, usage, the
//! metrics and `[DONE]` are here, once.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use serde::Serialize;

use super::dto::{PromptTokensDetails, Usage};
use super::{ApiError, AppState};
use crate::engine::{AdapterVersion, Event, EventStream, FinishReason, TokenLogprob, ValidRequest};

/// One choice being generated.
pub(super) struct Choice {
    pub(super) index: usize,
    pub(super) prompt: Arc<Vec<u32>>,
    stream: EventStream,
    /// The first event, read ahead so that errors (adapter load failures) become HTTP errors
    /// rather than broken streams.
    first: Option<Event>,
}

/// A request's choices, as they run.
pub(super) struct Started {
    pub(super) choices: Vec<Choice>,
    /// When the request was submitted (time to first token counts from here).
    clock: Instant,
}

/// Submit every choice of `valid` and wait for each one's first event.
pub(super) async fn start(s: &AppState, valid: ValidRequest) -> Result<Started, ApiError> {
    let clock = Instant::now();
    let n = valid.n();
    let prompts: Vec<Arc<Vec<u32>>> = valid.prompts().iter().cloned().map(Arc::new).collect();
    let streams = s.engine.submit(valid)?;
    let mut choices: Vec<Choice> = streams
        .into_iter()
        .enumerate()
        .map(|(index, stream)| Choice {
            index,
            prompt: Arc::clone(&prompts[index / n]),
            stream,
            first: None,
        })
        .collect();
    for ch in choices.iter_mut() {
        match ch.stream.next().await {
            Some(Event::Error(e)) => return Err(e.into()),
            Some(ev) => ch.first = Some(ev),
            None => return Err(ApiError::Unavailable),
        }
    }
    Ok(Started { choices, clock })
}

/// A choice as it finished.
#[derive(Default)]
pub(super) struct Collected {
    pub(super) index: usize,
    pub(super) prompt: Arc<Vec<u32>>,
    pub(super) text: String,
    pub(super) tokens: Vec<u32>,
    pub(super) logprobs: Vec<TokenLogprob>,
    /// Log-probabilities of prompt tokens 1.., when asked for.
    pub(super) prompt_logprobs: Option<Vec<TokenLogprob>>,
    pub(super) finish: Option<FinishReason>,
}

/// Every choice of a request, finished.
pub(super) struct Outcome {
    /// In choice order.
    pub(super) choices: Vec<Collected>,
    pub(super) usage: Usage,
    /// The adapter version that served it.
    pub(super) served: Option<AdapterVersion>,
}

/// Wait for every choice to finish.
pub(super) async fn collect(s: &AppState, started: Started) -> Result<Outcome, ApiError> {
    let clock = started.clock;
    let mut out = Outcome {
        choices: Vec::with_capacity(started.choices.len()),
        usage: usage(0, 0, 0),
        served: None,
    };
    for mut ch in started.choices {
        let mut c = Collected {
            index: ch.index,
            prompt: Arc::clone(&ch.prompt),
            ..Collected::default()
        };
        let mut next = ch.first.take();
        while let Some(ev) = next.take() {
            match ev {
                Event::PromptLogprobs(lps) => c.prompt_logprobs = Some(lps),
                Event::Token {
                    token_id,
                    text,
                    logprob,
                } => {
                    if c.tokens.is_empty() {
                        s.metrics.observe_ttft(clock.elapsed().as_secs_f64());
                    }
                    c.tokens.push(token_id);
                    c.text.push_str(&text);
                    c.logprobs.extend(logprob);
                }
                Event::Done {
                    finish_reason,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                    adapter,
                    text,
                } => {
                    c.text.push_str(&text);
                    c.finish = Some(finish_reason);
                    add(
                        &mut out.usage,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                    );
                    out.served = adapter;
                    s.metrics.record_tokens(
                        prompt_tokens,
                        completion_tokens,
                        clock.elapsed().as_secs_f64(),
                    );
                    break;
                }
                Event::Error(e) => return Err(e.into()),
            }
            next = ch.stream.next().await;
            if next.is_none() {
                return Err(ApiError::Unavailable);
            }
        }
        out.choices.push(c);
    }
    out.choices.sort_by_key(|c| c.index);
    Ok(out)
}

pub(super) fn usage(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Usage {
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: PromptTokensDetails { cached_tokens },
    }
}

fn add(u: &mut Usage, prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) {
    *u = usage(
        u.prompt_tokens + prompt_tokens,
        u.completion_tokens + completion_tokens,
        u.prompt_tokens_details.cached_tokens + cached_tokens,
    );
}

/// How an endpoint's stream chunks look.
pub(super) trait Render: Send + 'static {
    type Chunk: Serialize;

    /// Chunks before any token (chat: the assistant role of every choice).
    fn opening(&self, _indices: &[usize]) -> Vec<Self::Chunk> {
        Vec::new()
    }

    /// A token's text (possibly empty) of choice `index`; `first` for its first token.
    fn token(&self, t: TokenChunk<'_>) -> Self::Chunk;

    /// The end of choice `index`, with any text held back until then.
    fn finish(
        &self,
        index: usize,
        text: String,
        reason: FinishReason,
        served: Option<AdapterVersion>,
    ) -> Self::Chunk;

    /// The usage of the whole request (`stream_options.include_usage`).
    fn usage(&self, usage: Usage) -> Self::Chunk;
}

/// One token of a streamed choice.
pub(super) struct TokenChunk<'a> {
    pub(super) index: usize,
    /// Whether it is the choice's first token.
    pub(super) first: bool,
    pub(super) prompt: &'a [u32],
    pub(super) text: String,
    pub(super) token_id: u32,
    pub(super) logprob: Option<TokenLogprob>,
}

/// The state of a streamed response between events.
struct Streaming<R> {
    events: BoxStream<'static, (usize, Arc<Vec<u32>>, Event)>,
    s: AppState,
    render: R,
    clock: Instant,
    include_usage: bool,
    /// Choices not finished yet.
    remaining: usize,
    usage: Usage,
    /// Choices that have sent a token.
    started: HashSet<usize>,
    done: bool,
}

fn sse_json<T: Serialize>(v: &T) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(serde_json::to_string(v).unwrap_or_default()))
}

impl<R: Render> Streaming<R> {
    /// The next events to send; `None` once `[DONE]` went out.
    async fn next(&mut self) -> Option<Vec<Result<SseEvent, Infallible>>> {
        if self.done {
            return None;
        }
        loop {
            if self.remaining == 0 {
                self.done = true;
                let mut out = Vec::new();
                if self.include_usage {
                    out.push(sse_json(&self.render.usage(self.usage.clone())));
                }
                out.push(Ok(SseEvent::default().data("[DONE]")));
                return Some(out);
            }
            let Some((index, prompt, ev)) = self.events.next().await else {
                self.remaining = 0;
                continue;
            };
            let item = match ev {
                Event::PromptLogprobs(_) => continue,
                Event::Token {
                    token_id,
                    text,
                    logprob,
                } => {
                    let first = self.started.insert(index);
                    if first {
                        self.s
                            .metrics
                            .observe_ttft(self.clock.elapsed().as_secs_f64());
                    }
                    sse_json(&self.render.token(TokenChunk {
                        index,
                        first,
                        prompt: &prompt,
                        text,
                        token_id,
                        logprob,
                    }))
                }
                Event::Done {
                    finish_reason,
                    prompt_tokens,
                    cached_tokens,
                    completion_tokens,
                    text,
                    adapter,
                } => {
                    self.remaining -= 1;
                    add(
                        &mut self.usage,
                        prompt_tokens,
                        completion_tokens,
                        cached_tokens,
                    );
                    self.s.metrics.record_tokens(
                        prompt_tokens,
                        completion_tokens,
                        self.clock.elapsed().as_secs_f64(),
                    );
                    sse_json(&self.render.finish(index, text, finish_reason, adapter))
                }
                Event::Error(e) => {
                    self.remaining -= 1;
                    sse_json(&ApiError::from(e).body())
                }
            };
            return Some(vec![item]);
        }
    }
}

/// Merge the choices' events into one stream (choices interleave as tokens arrive).
fn merged_events(choices: Vec<Choice>) -> BoxStream<'static, (usize, Arc<Vec<u32>>, Event)> {
    let per_choice = choices.into_iter().map(|mut ch| {
        let first = ch.first.take();
        let (index, prompt) = (ch.index, ch.prompt);
        stream::iter(first)
            .chain(stream::unfold(ch.stream, |mut s| async move {
                s.next().await.map(|e| (e, s))
            }))
            .map(move |e| (index, Arc::clone(&prompt), e))
            .boxed()
    });
    stream::select_all(per_choice).boxed()
}

/// Stream `started`'s choices as server-sent events ending in `data: [DONE]`.
pub(super) fn sse<R: Render>(
    s: AppState,
    started: Started,
    render: R,
    include_usage: bool,
) -> Response {
    let indices: Vec<usize> = started.choices.iter().map(|c| c.index).collect();
    let opening: Vec<Result<SseEvent, Infallible>> =
        render.opening(&indices).iter().map(sse_json).collect();
    let state = Streaming {
        remaining: started.choices.len(),
        events: merged_events(started.choices),
        s,
        render,
        clock: started.clock,
        include_usage,
        usage: usage(0, 0, 0),
        started: HashSet::new(),
        done: false,
    };
    let body = stream::unfold(state, |mut st| async move {
        st.next().await.map(|items| (stream::iter(items), st))
    })
    .flatten();
    let all: std::pin::Pin<Box<dyn Stream<Item = Result<SseEvent, Infallible>> + Send>> =
        Box::pin(stream::iter(opening).chain(body));
    Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response()
}

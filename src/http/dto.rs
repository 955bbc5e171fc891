//! OpenAI-compatible request and response bodies, field for field, plus dora-serve's
//! additions (`adapter`, `top_k`, `ignore_eos`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `prompt`: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

// Written by hand: the schema says what the handler requires (nothing empty), which the derive
// cannot express for enum variants.
impl utoipa::PartialSchema for Prompt {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        let text = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
        };
        let ids = || {
            ArrayBuilder::new()
                .items(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(0)),
                )
                .min_items(Some(1))
        };
        OneOfBuilder::new()
            .item(text())
            .item(ArrayBuilder::new().items(text()).min_items(Some(1)))
            .item(ids())
            .item(ArrayBuilder::new().items(ids()).min_items(Some(1)))
            .description(Some(
                "a string, strings, token ids, or lists of token ids (none empty)",
            ))
            .into()
    }
}

impl ToSchema for Prompt {}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// The base model's id, or an adapter's name (vLLM style).
    pub model: Option<String>,
    pub prompt: Prompt,
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 4294967295.0)]
    pub max_tokens: Option<u32>,
    #[schema(minimum = 0)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    /// dora-serve: sample among the k most likely tokens.
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 4294967295.0)]
    pub top_k: Option<u32>,
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    /// 0–5 alternatives per token.
    #[schema(maximum = 5)]
    pub logprobs: Option<u32>,
    pub echo: Option<bool>,
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f64>,
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f64>,
    pub user: Option<String>,
    /// dora-serve: the adapter to use; absent or null for the base model.
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    pub adapter: Option<String>,
    /// dora-serve: keep generating past end-of-sequence tokens (fixed-length benchmarks).
    pub ignore_eos: Option<bool>,
    /// Not supported; refused when set.
    #[schema(maximum = 1)]
    pub best_of: Option<u32>,
    #[schema(max_length = 0)]
    pub suffix: Option<String>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// As OpenAI reports it: how many prompt tokens were not computed again.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

/// Legacy completions log-probabilities.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    /// `text_completion`
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// dora-serve: the adapter that served the request (null: the base model).
    pub adapter: Option<String>,
    /// dora-serve: which load of that adapter served it (changes when it is replaced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_version: Option<u64>,
    /// dora-serve: content digest (`sha256:…`) of the adapter files that served it; equals the
    /// `digest` the upload answered with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_digest: Option<String>,
}

/// Chat message content: a string, or text parts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<MessageContent>,
    pub name: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatRequest {
    pub model: Option<String>,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessage>,
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 4294967295.0)]
    pub max_tokens: Option<u32>,
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 4294967295.0)]
    pub max_completion_tokens: Option<u32>,
    #[schema(minimum = 0)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 4294967295.0)]
    pub top_k: Option<u32>,
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    pub logprobs: Option<bool>,
    /// 0–20 alternatives per token (with `logprobs: true`).
    #[schema(maximum = 20)]
    pub top_logprobs: Option<u32>,
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f64>,
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f64>,
    pub user: Option<String>,
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    pub adapter: Option<String>,
    pub ignore_eos: Option<bool>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
    pub tools: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatResponse {
    pub id: String,
    /// `chat.completion`
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub adapter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_digest: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunk {
    pub id: String,
    /// `chat.completion.chunk`
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    pub adapter: Option<String>,
    /// On the chunk that finishes a choice: which load of the adapter served it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_version: Option<u64>,
    /// On the chunk that finishes a choice: the adapter files' digest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_digest: Option<String>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// `model`
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// For adapters: the base model's id.
    pub parent: Option<String>,
    /// For adapters: `dora` or `lora`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// For adapters: `on_disk`, `loading`, `loaded`, `merged` or `invalid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// For the base model: how its weights are held, and the memory in use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseDescription>,
}

/// The base model's formats and resident bytes (on its `GET /v1/models` entry).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BaseDescription {
    /// The decoder family: llama, mistral, qwen2, qwen3, gemma2, gemma3 or phi3.
    pub family: String,
    /// The longest sequence (prompt and generated tokens) served.
    pub max_model_len: usize,
    /// The name the model file gives itself (GGUF `general.name`), when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tensors per format, most numerous first, e.g. `113 Q4_K, 17 Q6_K, 65 F32 (668.4 MB)`.
    pub formats: String,
    /// Tensor count per format (`Q4_K`, `Q8_0`, `F32`, `BF16`, …).
    pub tensors: std::collections::BTreeMap<String, usize>,
    /// Bytes of the base weights as held (stored formats count their stored size).
    pub weight_bytes: usize,
    /// Bytes of the KV caches of running sequences.
    pub kv_cache_bytes: usize,
    /// Bytes of adapters loaded in the cache, and of merged weights.
    pub adapter_bytes: usize,
    pub merged_bytes: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// An adapter in the store.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterDescription {
    pub name: String,
    /// `dora` or `lora`.
    #[serde(rename = "type")]
    pub kind: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// Adapted modules (after target/exclude/layer filters), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modules: Option<usize>,
    /// Bytes it holds once loaded, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<usize>,
    /// `on_disk`, `loading`, `loaded` (in the adapter cache: uploads and registrations go
    /// there as they were validated), `merged`, or `invalid` (stored files that do not
    /// validate; see `error`).
    pub state: String,
    /// Content digest of the adapter files (`sha256:…`), when known (uploads and loaded ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Why a stored adapter is refused (state `invalid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterList {
    /// `list`
    pub object: &'static str,
    pub data: Vec<AdapterDescription>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Deleted {
    pub name: String,
    pub deleted: bool,
}

/// vLLM's `POST /v1/load_lora_adapter`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct LoadLoraRequest {
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    pub lora_name: String,
    /// A folder under the server's `--adapter-root` holding the two adapter files.
    #[schema(min_length = 1)]
    pub lora_path: String,
}

/// vLLM's `POST /v1/unload_lora_adapter`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct UnloadLoraRequest {
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    pub lora_name: String,
}

/// The multipart form of `POST /v1/adapters`.
#[allow(dead_code)] // documentation only: the handler reads the fields one by one
#[derive(ToSchema)]
pub struct AdapterUpload {
    /// The adapter's name: 1–64 characters from A-Z a-z 0-9 . _ - starting with a letter or digit.
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    pub name: String,
    /// PEFT's adapter_config.json.
    #[schema(value_type = String, format = Binary)]
    pub adapter_config: Vec<u8>,
    /// PEFT's adapter_model.safetensors.
    #[schema(value_type = String, format = Binary)]
    pub adapter_model: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// `GET /ready`: whether this replica can serve every adapter. `/health` stays up while the
/// adapter store is unreachable (cached adapters keep serving); this says so.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Ready {
    /// `ready`, or `adapter_store_unavailable` (with status 503).
    pub status: &'static str,
    pub adapter_store: StoreState,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StoreState {
    /// `file://DIR` or `s3://BUCKET/PREFIX`.
    pub url: String,
    /// Shared by replicas (an object store).
    pub remote: bool,
    /// The last operation on the store succeeded.
    pub up: bool,
    /// The last failure while down.
    pub error: Option<String>,
}

/// One server-sent event of a streamed completion (`stream: true`), as an SSE parser reads it:
/// the OpenAPI document's `text/event-stream` schema, which fuzzers check each event against.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerSentEvent {
    /// One chunk as JSON (a `CompletionResponse` or `ChatChunk` object), or `[DONE]` last.
    pub data: String,
    /// The event's type where the stream names one (an SSE parser reads `message` otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
}

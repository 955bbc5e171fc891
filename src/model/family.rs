//! The model families dora-serve serves, each described by how it differs from llama.
//!
//! There is one decoder ([`super::Decoder`]); a family is not a copied model file but a
//! [`Traits`] value naming its differences in one place: biases, per-head q/k norms, the
//! norm's `1 + w` offset, embedding scale, activation, norms after attention and MLP, fused
//! projections, and how its GGUF files store it. Numbers that vary per checkpoint (soft-caps,
//! windows, rope parameters) live in [`super::ModelConfig`]. Adding a family means adding a
//! variant here, its `config.json` defaults in `config.rs`, and its test fixture.

/// A decoder family, by the name its `config.json` (`model_type`) or GGUF file
/// (`general.architecture`) gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// Llama 2/3, TinyLlama, SmolLM2 (and any `LlamaForCausalLM`).
    Llama,
    /// Mistral: llama with an optional sliding window on every layer.
    Mistral,
    /// Qwen2 / Qwen2.5: bias on q, k and v.
    Qwen2,
    /// Qwen3: RMSNorm per head on q and k before rope, no bias.
    Qwen3,
    /// Gemma 2: `1 + w` norms, scaled embeddings, GeGLU (tanh), norms after attention and MLP,
    /// soft-capped attention and final logits, alternating sliding windows.
    Gemma2,
    /// Gemma 3 (text): Gemma 2 without soft-caps, with q/k norms, a 5:1 local:global pattern
    /// and a rope base of its own for local layers.
    Gemma3,
    /// Phi-3 / Phi-3.5: fused `qkv_proj` and `gate_up_proj`, longrope.
    Phi3,
}

/// The activation of the gated MLP: `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU).
    Silu,
    /// GELU with the tanh approximation (`gelu_pytorch_tanh`, GeGLU).
    GeluTanh,
}

/// How a family differs from llama; every field `false`/plain is llama.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traits {
    /// Bias on q, k and v (not o), whatever `attention_bias` says (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm over each head of q and k, before rope (`q_norm`, `k_norm`).
    pub qk_norm: bool,
    /// RMSNorm computes `x̂ · (1 + w)` (Gemma) instead of `x̂ · w`.
    pub norm_plus_one: bool,
    /// Embeddings multiplied by `√hidden` (in the serving dtype, as transformers does).
    pub embed_scale: bool,
    /// Norms after attention and after the MLP, and one before the MLP under another name:
    /// `post_attention_layernorm` is applied to the attention output, `pre_feedforward_layernorm`
    /// before the MLP and `post_feedforward_layernorm` after it (Gemma 2/3).
    pub sandwich_norms: bool,
    /// q, k and v are one `qkv_proj` (Phi-3); PEFT adapters target the fused module.
    pub fused_qkv: bool,
    /// gate and up are one `gate_up_proj`, gate rows first (Phi-3).
    pub fused_gate_up: bool,
    /// llama.cpp's converter permutes Q/K rows for its interleaved rope (llama, mistral only).
    pub gguf_qk_permuted: bool,
    /// llama.cpp's converter stores Gemma's norm weights with the `+ 1` already added.
    pub gguf_norms_plus_one: bool,
}

const LLAMA: Traits = Traits {
    qkv_bias: false,
    qk_norm: false,
    norm_plus_one: false,
    embed_scale: false,
    sandwich_norms: false,
    fused_qkv: false,
    fused_gate_up: false,
    gguf_qk_permuted: true,
    gguf_norms_plus_one: false,
};

const GEMMA: Traits = Traits {
    norm_plus_one: true,
    embed_scale: true,
    sandwich_norms: true,
    gguf_qk_permuted: false,
    gguf_norms_plus_one: true,
    ..LLAMA
};

impl Family {
    pub const ALL: [Family; 7] = [
        Family::Llama,
        Family::Mistral,
        Family::Qwen2,
        Family::Qwen3,
        Family::Gemma2,
        Family::Gemma3,
        Family::Phi3,
    ];

    /// The family of an HF `model_type`.
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        Some(match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    /// The family of a GGUF `general.architecture`.
    pub fn from_gguf_arch(arch: &str) -> Option<Family> {
        Some(match arch {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    /// The names this server accepts, for error messages.
    pub fn supported_names() -> &'static str {
        "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3 (GGUF: llama, qwen2, qwen3, gemma2, gemma3, phi3)"
    }

    pub fn traits(self) -> Traits {
        match self {
            Family::Llama | Family::Mistral => LLAMA,
            Family::Qwen2 => Traits {
                qkv_bias: true,
                gguf_qk_permuted: false,
                ..LLAMA
            },
            Family::Qwen3 => Traits {
                qk_norm: true,
                gguf_qk_permuted: false,
                ..LLAMA
            },
            Family::Gemma2 => GEMMA,
            Family::Gemma3 => Traits {
                qk_norm: true,
                ..GEMMA
            },
            Family::Phi3 => Traits {
                fused_qkv: true,
                fused_gate_up: true,
                gguf_qk_permuted: false,
                ..LLAMA
            },
        }
    }

    /// Tokens that end a turn besides the file's EOS, as the family's `generation_config.json`
    /// lists them (GGUF files keep one EOS id; llama.cpp adds these by name too).
    pub fn end_of_turn_tokens(self) -> &'static [&'static str] {
        match self {
            Family::Gemma2 | Family::Gemma3 => &["<end_of_turn>"],
            Family::Qwen2 | Family::Qwen3 => &["<|im_end|>", "<|endoftext|>"],
            Family::Phi3 => &["<|end|>", "<|endoftext|>"],
            Family::Llama | Family::Mistral => &[],
        }
    }

    /// The chat template of the family's released instruct models, for a GGUF file that
    /// carries none (Gemma's, which has no system role: a system message is put before the
    /// first user turn, as the official template does).
    pub fn default_chat_template(self) -> Option<&'static str> {
        match self {
            Family::Gemma2 | Family::Gemma3 => Some(GEMMA_TEMPLATE),
            _ => None,
        }
    }

    /// The activation a family uses when its config names none.
    pub fn default_activation(self) -> Activation {
        match self {
            Family::Gemma2 | Family::Gemma3 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
        })
    }
}

/// Gemma 2/3's chat template as the released instruct models ship it (text parts only).
const GEMMA_TEMPLATE: &str = "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}\
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}\
{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}\
{%- for message in loop_messages -%}\
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}\
{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}\
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}\
{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}";
